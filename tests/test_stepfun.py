"""Truth tests of stepfun (mip-NeRF 360's step functions), in the spirit of multinerf's stepfun_test.py.

The references are brute-force loops over intervals, double integrals on fine grids, Monte-Carlo
estimates, closed forms and autograd (gradcheck); tolerances are a few standard errors of the
Monte-Carlo estimates or the known error of the quadrature.
"""

import math

import pytest
import torch

import stepfun

f64 = torch.float64


def _sorted_uniform(gen, shape, lo=-3.0, hi=3.0, dtype=f64):
    return torch.sort(lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=dtype), dim=-1).values


def _softmax_weights(gen, shape, scale=2.0, dtype=f64):
    return torch.softmax(scale * torch.randn(shape, generator=gen, dtype=dtype), dim=-1)


def _cdf(x, t, w):
    """Brute force: the CDF of the piecewise-constant density (t, w) at x `[M]` (1-D t, w)."""
    frac = ((x[:, None] - t[None, :-1]) / (t[None, 1:] - t[None, :-1])).clamp(0, 1)
    return (frac * w[None, :]).sum(-1)


def _mass(t0, t1, w1):
    """Brute force: the integral of the density (t1, w1) over each interval of t0 (1-D)."""
    lo = torch.maximum(t0[:-1, None], t1[None, :-1])
    hi = torch.minimum(t0[1:, None], t1[None, 1:])
    overlap = (hi - lo).clamp_min(0) / (t1[None, 1:] - t1[None, :-1])
    return (overlap * w1[None, :]).sum(-1)


# ----------------------------------------------------------------------------
# searchsorted, query, inner/outer measures.


def test_searchsorted_brackets_every_query_and_clamps_outside():
    gen = torch.Generator().manual_seed(0)
    a = torch.cat([torch.zeros(4, 3, 1), torch.rand(4, 3, 30, generator=gen).sort(-1).values, torch.ones(4, 3, 1)], -1)
    v = 1e-7 + (1 - 2e-7) * torch.rand(4, 3, 50, generator=gen)
    lo, hi = stepfun.searchsorted(a, v)
    assert torch.all(torch.gather(a, -1, lo) <= v) and torch.all(v < torch.gather(a, -1, hi))
    torch.testing.assert_close(hi, torch.searchsorted(a, v, right=True))
    # Out of range: both indices at the first or last point.
    lo, hi = stepfun.searchsorted(a, torch.full((4, 3, 5), -0.5))
    assert torch.all(lo == 0) and torch.all(hi == 0)
    lo, hi = stepfun.searchsorted(a, torch.full((4, 3, 5), 1.0))  # v == a[-1] counts as outside.
    assert torch.all(lo == 31) and torch.all(hi == 31)
    # Brute force, with ties in a and queries on the points, and a 1-D a broadcast over v's batch.
    a1 = torch.tensor([-2.0, -1.0, -1.0, 0.0, 0.5, 3.0])
    v1 = torch.tensor([[-3.0, -2.0, -1.5, -1.0, 0.0, 0.2, 2.9, 3.0, 4.0]]).expand(2, -1)
    lo, hi = stepfun.searchsorted(a1, v1)
    for x, i0, i1 in zip(v1[0].tolist(), lo[1].tolist(), hi[1].tolist()):
        below = [i for i, ai in enumerate(a1.tolist()) if ai <= x]
        above = [i for i, ai in enumerate(a1.tolist()) if ai > x]
        assert i0 == (max(below) if below else 0) and i1 == (min(above) if above else len(a1) - 1)


@pytest.mark.parametrize('mode', ['front', 'back', 'before', 'after'])
def test_query_reads_each_interval_and_outside_value(mode):
    gen = torch.Generator().manual_seed(1)
    t = -4 + torch.cumsum(0.1 + torch.rand(10, 9, generator=gen, dtype=f64), -1)  # Widths >= 0.1.
    y = torch.randn(10, 8, generator=gen, dtype=f64)
    for delta in (0.0, 0.05, 0.099):
        if mode == 'front':
            torch.testing.assert_close(stepfun.query(t[:, :-1] + delta, t, y, -10.0), y, rtol=0, atol=0)
        elif mode == 'back':
            torch.testing.assert_close(stepfun.query(t[:, 1:] - delta - 1e-9, t, y, -10.0), y, rtol=0, atol=0)
        elif mode == 'before':
            tq = t[:, :1] - delta - 1e-9 - torch.linspace(0, 10, 50, dtype=f64)
            assert torch.all(stepfun.query(tq, t, y, -10.0) == -10)
        else:  # The last endpoint itself is outside (intervals are half-open).
            tq = t[:, -1:] + delta + torch.linspace(0, 10, 50, dtype=f64)
            assert torch.all(stepfun.query(tq, t, y, -10.0) == -10)


def _inner_ref(t0, t1, w1):
    """multinerf's reference loops: intervals of t1 inside interval i of t0 (right end excluded)."""
    out = torch.zeros(len(t0) - 1, dtype=w1.dtype)
    for i in range(len(t0) - 1):
        for j in range(len(t1) - 1):
            if t1[j] >= t0[i] and t1[j + 1] < t0[i + 1]:
                out[i] += w1[j]
    return out


def _outer_ref(t0, t1, w1):
    """Intervals of t1 that touch interval i of t0 (closed)."""
    out = torch.zeros(len(t0) - 1, dtype=w1.dtype)
    for i in range(len(t0) - 1):
        for j in range(len(t1) - 1):
            if t1[j + 1] >= t0[i] and t1[j] <= t0[i + 1]:
                out[i] += w1[j]
    return out


def test_inner_outer_match_brute_force_loops():
    gen = torch.Generator().manual_seed(2)
    for d0, d1 in [(12, 17), (19, 10), (15, 15)]:
        t0 = _sorted_uniform(gen, (3, d0 + 1), 0, 1)
        t1 = _sorted_uniform(gen, (3, d1 + 1), 0, 1)
        w1 = torch.exp(torch.randn(3, d1, generator=gen, dtype=f64))
        inner, outer = stepfun.inner_outer(t0, t1, w1)
        for b in range(3):
            torch.testing.assert_close(inner[b], _inner_ref(t0[b], t1[b], w1[b]))
            torch.testing.assert_close(outer[b], _outer_ref(t0[b], t1[b], w1[b]))


@pytest.mark.parametrize('layout', ['arbitrary', 'nested', 'histograms'])
def test_inner_and_outer_measures_bound_the_true_mass(layout):
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        if layout == 'histograms':  # Two histograms of the same points (multinerf's test).
            t0 = _sorted_uniform(gen, (14,), 0, 1)
            t1 = _sorted_uniform(gen, (18,), 0, 1)
            lo, hi = max(t0[0], t1[0]) + 0.1, min(t0[-1], t1[-1]) - 0.1
            pts = lo + (hi - lo) * torch.rand(30, generator=gen, dtype=f64)
            w0 = torch.histogram(pts, t0).hist
            w1 = torch.histogram(pts, t1).hist
        else:
            t1 = _sorted_uniform(gen, (25,))
            w1 = torch.rand(24, generator=gen, dtype=f64) * (torch.rand(24, generator=gen) > 0.2)
            if layout == 'nested':  # Coarser intervals made of the finer ones (plus a margin).
                t0 = torch.cat([t1[:1] - 1, t1[2:-2:3], t1[-1:] + 1])
            else:
                t0 = _sorted_uniform(gen, (13,), -3.5, 3.5)
            w0 = _mass(t0, t1, w1)
        inner, outer = stepfun.inner_outer(t0, t1, w1)
        assert torch.all(inner <= w0 + 1e-12) and torch.all(w0 <= outer + 1e-12)
        assert torch.all(inner >= 0) and inner.sum() <= w1.sum() + 1e-12  # Each w1 is inside one interval at most.


# ----------------------------------------------------------------------------
# The proposal loss (Eqs. 12-13).


def test_lossfun_outer_is_zero_under_an_envelope_and_positive_above_it():
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        t = _sorted_uniform(gen, (4, 21))
        w = _softmax_weights(gen, (4, 20))
        # The envelope: the outer measure of (t, w) on arbitrary intervals covering t's range.
        t_env = torch.cat([t[:, :1] - 0.1, _sorted_uniform(gen, (4, 9)), t[:, -1:] + 0.1], -1).sort(-1).values
        _, w_env = stepfun.inner_outer(t_env, t, w)
        assert stepfun.lossfun_outer(t, w, t_env, w_env).max() < 1e-12
        assert stepfun.lossfun_outer(t, w, t, w).max() < 1e-12  # Itself.
        # Half the histogram itself is no envelope: with shared endpoints the bound of interval i is
        # (w[i] + w[i+1]) / 2 (the searches are half-open: [t[i], t[i+1]] reaches into interval i+1).
        bound = (w + torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], -1)) / 2
        excess = stepfun.lossfun_outer(t, w, t, w / 2)
        torch.testing.assert_close(excess, (w - bound).clamp_min(0) ** 2 / (w + stepfun._EPS))
        assert excess.max() > 0
    # Closed forms: one interval of weight 1 under an envelope of 0.25, and under nothing.
    t1, w1 = torch.tensor([0.0, 1.0], dtype=f64), torch.tensor([1.0], dtype=f64)
    eps = stepfun._EPS
    assert stepfun.lossfun_outer(t1, w1, t1, torch.tensor([0.25], dtype=f64)).item() == pytest.approx(
        0.75**2 / (1 + eps)
    )
    far = torch.tensor([5.0, 6.0], dtype=f64)
    assert stepfun.lossfun_outer(t1, w1, far, torch.tensor([1.0], dtype=f64)).item() == pytest.approx(1 / (1 + eps))


@pytest.mark.parametrize('num_ablate,all_zero', [(0, True), (2, False)])
def test_lossfun_outer_of_histograms_of_the_same_points(num_ablate, all_zero):
    """multinerf's test: the proposal histogram of the same points bounds the NeRF's; of fewer, not."""
    gen = torch.Generator().manual_seed(5)
    zero = True
    for _ in range(10):
        t0 = _sorted_uniform(gen, (16,), 0, 1)
        t1 = _sorted_uniform(gen, (13,), 0, 1)
        lo, hi = max(t0[0], t1[0]) + 0.1, min(t0[-1], t1[-1]) - 0.1
        pts = lo + (hi - lo) * torch.rand(15, generator=gen, dtype=f64)
        kept = pts[: len(pts) - num_ablate]
        w0 = torch.histogram(kept, t0).hist / len(kept)
        w1 = torch.histogram(pts, t1).hist / len(pts)
        zero &= bool(torch.all(stepfun.lossfun_outer(t0, w0, t1, w1) < 1e-12))
    assert zero == all_zero


def test_lossfun_outer_is_invariant_to_monotonic_warps_of_t():
    gen = torch.Generator().manual_seed(6)
    for _ in range(10):
        t0, t1 = _sorted_uniform(gen, (15,), 0, 1), _sorted_uniform(gen, (12,), 0, 1)
        w0, w1 = (
            torch.exp(torch.randn(14, generator=gen, dtype=f64)),
            torch.exp(torch.randn(11, generator=gen, dtype=f64)),
        )
        excess = stepfun.lossfun_outer(t0, w0, t1, w1)
        assert torch.equal(excess, stepfun.lossfun_outer(1 + t0**3, w0, 1 + t1**3, w1))


def test_lossfun_outer_gradcheck_and_gradient_direction():
    gen = torch.Generator().manual_seed(7)
    t = _sorted_uniform(gen, (2, 9))
    t_env = _sorted_uniform(gen, (2, 7))
    w = (0.2 + torch.rand(2, 8, generator=gen, dtype=f64)).requires_grad_(True)
    w_env = (0.1 * torch.rand(2, 6, generator=gen, dtype=f64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: stepfun.lossfun_outer(t, a, t_env, b), (w, w_env))
    # Raising the envelope never raises the loss.
    (g_env,) = torch.autograd.grad(stepfun.lossfun_outer(t, w, t_env, w_env).sum(), w_env)
    assert torch.all(g_env <= 0) and torch.any(g_env < 0)


def test_weight_pdf_round_trip():
    gen = torch.Generator().manual_seed(8)
    t = _sorted_uniform(gen, (3, 11))
    w = _softmax_weights(gen, (3, 10))
    p = stepfun.weight_to_pdf(t, w)
    torch.testing.assert_close(p * (t[..., 1:] - t[..., :-1]), w)
    torch.testing.assert_close(stepfun.pdf_to_weight(t, p), w)
    # A zero-width interval gets a finite (huge) density instead of inf.
    assert torch.isfinite(stepfun.weight_to_pdf(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.5, 0.5]))).all()


# ----------------------------------------------------------------------------
# Dilation.


def test_max_dilate_is_the_max_pool_of_the_step_function():
    """multinerf's test: query the dilation on a grid, against the max over a window of the grid."""
    gen = torch.Generator().manual_seed(9)
    n, d, dilation = 20, 8, 0.53
    # Endpoints on multiples of 0.1, queries halfway between: no ties between grid and edges.
    t = torch.cumsum(torch.randint(1, 10, (n, d + 1), generator=gen), -1).to(f64) / 10
    w = _softmax_weights(gen, (n, d), 1.0)
    td, wd = stepfun.max_dilate(t, w, dilation)
    assert td.shape == (n, 3 * d + 1) and wd.shape == (n, 3 * d)
    tq = (torch.arange((d + 4) * 10, dtype=f64) - 2.5) / 10
    wq = stepfun.query(tq[None], t, w)
    wdq = stepfun.query(tq[None], td, wd)
    window = (tq[None, :] - tq[:, None]).abs() <= dilation
    expected = torch.where(window[None], wq[:, None, :], torch.zeros(())).amax(-1)
    torch.testing.assert_close(wdq, expected, rtol=0, atol=0)
    assert torch.all(wdq >= wq)  # Never below the original.
    # No dilation: the same function.
    t0, w0 = stepfun.max_dilate(t, w, 0.0)
    torch.testing.assert_close(stepfun.query(tq[None], t0, w0), wq, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [torch.float32, f64])
def test_max_dilate_weights_respects_domain_and_over_estimates(dtype):
    gen = torch.Generator().manual_seed(10)
    t = torch.cat([torch.zeros(6, 1), torch.rand(6, 15, generator=gen).sort(-1).values, torch.ones(6, 1)], -1).to(dtype)
    w = _softmax_weights(gen, (6, 16), dtype=dtype)
    dilation = torch.rand(6, 1, generator=gen, dtype=dtype) * 0.05
    td, wd = stepfun.max_dilate_weights(t, w, dilation, domain=(0.0, 1.0))
    assert td.dtype == dtype and torch.all(td >= 0) and torch.all(td <= 1)
    assert torch.all(td[..., 1:] >= td[..., :-1])
    assert torch.all(wd >= 0) and torch.all(wd.sum(-1) >= w.sum(-1) * (1 - 1e-5))
    # The density is never lower anywhere (queried at the midpoints of the fine intervals).
    grid = torch.linspace(0.0005, 0.9995, 1000, dtype=dtype).expand(6, -1)
    p, pd = stepfun.weight_to_pdf(t, w), stepfun.weight_to_pdf(td, wd)
    assert torch.all(stepfun.query(grid, td, pd) >= stepfun.query(grid, t, p) * (1 - 1e-5))
    _, wn = stepfun.max_dilate_weights(t, w, dilation, domain=(0.0, 1.0), renormalize=True)
    torch.testing.assert_close(wn.sum(-1), torch.ones(6, dtype=dtype))


# ----------------------------------------------------------------------------
# CDF, inverse CDF and sampling.


def test_integrate_weights_is_the_cdf_with_exact_ends():
    gen = torch.Generator().manual_seed(11)
    w = _softmax_weights(gen, (3, 4, 10), dtype=torch.float32)
    cw = stepfun.integrate_weights(w)
    assert cw.shape == (3, 4, 11)
    assert torch.all(cw[..., 0] == 0) and torch.all(cw[..., -1] == 1)
    assert torch.all(cw[..., 1:] >= cw[..., :-1]) and torch.all(cw <= 1)
    torch.testing.assert_close(cw[..., 1:-1], torch.cumsum(w, -1)[..., :-1])


def test_invert_cdf_inverts_the_piecewise_linear_cdf():
    gen = torch.Generator().manual_seed(12)
    for _ in range(5):
        t = _sorted_uniform(gen, (17,))
        logits = torch.randn(16, generator=gen, dtype=f64)
        logits[[3, 9]] = -math.inf  # Bins that must get nothing.
        w = torch.softmax(logits, -1)
        u = torch.rand(200, generator=gen, dtype=f64)
        x = stepfun.invert_cdf(u, t, logits)
        torch.testing.assert_close(_cdf(x, t, w), u, rtol=0, atol=1e-12)
        assert torch.all((x < t[3]) | (x >= t[4])) and torch.all((x < t[9]) | (x >= t[10]))


def _histograms(n_rays=4, num_bins=16, seed=13):
    """Random histograms with zero-width bins and zero weights (as multinerf's test)."""
    gen = torch.Generator().manual_seed(seed)
    widths = torch.exp(6 * torch.rand(n_rays, num_bins, generator=gen, dtype=f64) - 3)
    widths = widths * (torch.rand(n_rays, num_bins, generator=gen) < 0.85)
    widths[:, -1] += 0.1  # The last bin has a width.
    t = torch.cat([torch.zeros(n_rays, 1, dtype=f64), torch.cumsum(widths, -1)], -1)
    t = t + 8 * torch.randn(n_rays, 1, generator=gen, dtype=f64)
    w = (1.5 * torch.rand(n_rays, num_bins, generator=gen, dtype=f64) - 0.5).clamp_min(0)
    return t, w / w.sum(-1, keepdim=True)


def _counts_and_expected(samples, t, w):
    """Counts of samples per bin of t; a zero-width bin's mass lands at its edge, i.e. in the next bin."""
    idx = (torch.searchsorted(t, samples, right=True) - 1).clamp(0, t.shape[-1] - 2)
    counts = torch.zeros_like(w).scatter_add_(-1, idx, torch.ones_like(samples))
    expected = w.clone()
    for k in range(w.shape[-1] - 1):  # Carry each zero-width bin's mass to the next bin.
        carry = torch.where(t[..., k + 1] == t[..., k], expected[..., k], torch.zeros(()))
        expected[..., k] -= carry
        expected[..., k + 1] += carry
    return counts, expected * samples.shape[-1]


@pytest.mark.parametrize('mode', ['deterministic', 'deterministic_center', 'per_sample_jitter', 'single_jitter'])
def test_sample_follows_the_histogram(mode):
    t, w = _histograms()
    n = 200_000
    gen = torch.Generator().manual_seed(14)
    kw = dict(deterministic_center=mode == 'deterministic_center', single_jitter=mode == 'single_jitter')
    logits = torch.log(w) + 0.7  # Unnormalized; zero weights are -inf.
    s = stepfun.sample(t, logits, n, generator=gen if 'jitter' in mode else None, **kw)
    assert s.shape == (4, n) and torch.all(s[:, 1:] >= s[:, :-1])
    assert torch.all(s >= t[:, :1]) and torch.all(s <= t[:, -1:])
    counts, expected = _counts_and_expected(s, t, w)
    # Stratified: every bin holds its share of the N strata up to the two partial ones at its ends.
    assert torch.all((counts - expected).abs() <= 2.01)
    # And a chi-square test, which a wrong histogram fails.
    keep = expected > 0
    chi2 = ((counts - expected) ** 2 / expected.clamp_min(1e-30))[keep].sum()
    dof = keep.sum() - 4
    assert chi2 < dof + 6 * torch.sqrt(2.0 * dof)
    wrong = expected.roll(1, -1)
    chi2_wrong = ((counts - wrong) ** 2 / wrong.clamp_min(1e-30))[wrong > 0].sum()
    assert chi2_wrong > 1e3 * (dof + 6 * torch.sqrt(2.0 * dof))


def test_deterministic_sampling_is_reproducible_and_centered():
    t = torch.tensor([2.0, 3.0, 7.0, 9.0], dtype=f64)
    logits = torch.tensor([-math.inf, 0.0, -math.inf], dtype=f64)  # All mass on [3, 7].
    n = 10
    a = stepfun.sample(t, logits, n, deterministic_center=True)
    torch.testing.assert_close(a, stepfun.sample(t, logits, n, deterministic_center=True), rtol=0, atol=0)
    # The centres of n equal strata of [3, 7] (up to float32's eps, as the release), symmetric.
    torch.testing.assert_close(a, 3 + 4 * (torch.arange(n, dtype=f64) + 0.5) / n, rtol=0, atol=1e-5)
    assert abs(a.mean().item() - 5) < 1e-5
    # Without centring: the strata's starts, from the first endpoint to the last (less eps).
    b = stepfun.sample(t, logits, n)
    torch.testing.assert_close(b, 3 + 4 * torch.linspace(0, 1, n, dtype=f64), rtol=0, atol=1e-5)
    assert b[0] == 3 and b[-1] < 7


@pytest.mark.parametrize('single_jitter', [True, False])
def test_random_sampling_is_stratified_with_single_or_per_sample_jitter(single_jitter):
    n_rays, n = 2000, 16
    t = torch.tensor([0.0, 1.0], dtype=f64)  # Uniform on [0, 1]: samples are the u themselves.
    logits = torch.zeros(n_rays, 1, dtype=f64)
    u = stepfun.sample(t, logits, n, single_jitter=single_jitter, generator=torch.Generator().manual_seed(15))
    k = torch.arange(n, dtype=f64)
    stratum = torch.floor(u * n)
    assert torch.all(stratum == k) and torch.all(u >= 0) and torch.all(u < 1)  # One sample per stratum.
    gaps = u[:, 1:] - u[:, :-1]
    if single_jitter:  # One jitter per ray: evenly spaced.
        torch.testing.assert_close(gaps, torch.full_like(gaps, gaps[0, 0].item()), rtol=0, atol=1e-12)
    else:
        assert gaps.std(dim=-1).min() > 0.01
    # Within each stratum the sample is uniform: its mean offset is half a stratum.
    offset = (u * n - k).mean(0)
    assert torch.all((offset - 0.5).abs() < 5 * math.sqrt(1 / 12 / n_rays))
    # Seeds reproduce; rand=True draws from the global generator.
    again = stepfun.sample(t, logits, n, single_jitter=single_jitter, generator=torch.Generator().manual_seed(15))
    assert torch.equal(u, again)
    r1 = stepfun.sample(t, logits[:3], n, single_jitter=single_jitter, rand=True)
    r2 = stepfun.sample(t, logits[:3], n, single_jitter=single_jitter, rand=True)
    assert not torch.equal(r1, r2)
    one = stepfun.sample(t, logits, 1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(one).all() and one.std() > 0.2  # Uniform on [0, 1], not NaN.


@pytest.mark.parametrize('mode', ['deterministic', 'per_sample_jitter', 'single_jitter'])
def test_sample_single_bin_and_sparse_delta(mode):
    gen = torch.Generator().manual_seed(16) if 'jitter' in mode else None
    single = mode == 'single_jitter'
    bins = torch.tensor([0.0, 1.0, 3.0, 6.0, 10.0])
    for i in range(4):
        logits = torch.full((4,), -math.inf)
        logits[i] = 0.0
        s = stepfun.sample(bins, logits, 625, single_jitter=single, generator=gen)
        assert torch.all(s >= bins[i]) and torch.all(s <= bins[i + 1])
    # A flat histogram over 100k unit bins with one bin holding half the mass.
    bins = torch.arange(100_000, dtype=torch.float32)
    weights = torch.ones(99_999)
    weights[len(weights) // 2] = len(weights) - 1
    s = stepfun.sample(bins, torch.log(weights), 100, single_jitter=single, generator=gen)
    in_delta = ((s >= bins[49_999]) & (s <= bins[50_000])).float().mean()
    assert abs(in_delta.item() - 0.5) <= 0.05
    assert torch.all(s >= 0) and torch.all(s <= bins[-1])


def test_sample_intervals_of_a_single_interval_is_a_linspace():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    logits = torch.tensor([0.0, 0.0, 100.0, 0.0, 0.0])
    torch.testing.assert_close(stepfun.sample_intervals(t, logits, 10), torch.linspace(3, 4, 11), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        stepfun.sample_intervals(t, logits, 1)


@pytest.mark.parametrize('randomized', [False, True])
@pytest.mark.parametrize('bounded', [False, True])
def test_sample_intervals_are_unbiased(randomized, bounded):
    """multinerf's test: intervals resampled from one interval [-0.5, 0.5] are centred on it."""
    n, d = 1000, 64
    domain = (-0.5, 0.5) if bounded else (-math.inf, math.inf)
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]).expand(n, -1)
    logits = torch.tensor([0.0, 0.0, 100.0, 0.0, 0.0]).expand(n, -1)
    gen = torch.Generator().manual_seed(17) if randomized else None
    ts = stepfun.sample_intervals(t, logits, d, single_jitter=True, domain=domain, generator=gen)
    assert ts.shape == (n, d + 1) and torch.all(ts[:, 1:] >= ts[:, :-1])
    assert torch.all(ts >= domain[0]) and torch.all(ts <= domain[1])
    if randomized:
        assert ts.mean(-1).abs().max() < 0.5 / d
        assert abs((ts[:, 0] > -0.5).float().mean() - 0.5) <= 1 / d
        assert abs((ts[:, -1] < 0.5).float().mean() - 0.5) <= 1 / d
        if bounded:
            assert abs(ts[:, 0].median() + 0.5) < 1e-4 and abs(ts[:, -1].median() - 0.5) < 1e-4
    else:
        torch.testing.assert_close(ts.mean(-1), torch.zeros(n), rtol=0, atol=1e-5)


@pytest.mark.parametrize('randomized', [False, True])
def test_sample_intervals_split_the_mass_evenly(randomized):
    """multinerf's accuracy test: each resampled interval holds about 1/N of the original mass."""
    gen = torch.Generator().manual_seed(18)
    n, d, domain = 50, 32, (-3.0, 3.0)
    t = _sorted_uniform(gen, (n, d + 1), *domain)
    logits = 2 * torch.randn(n, d, generator=gen, dtype=f64)
    ts = stepfun.sample_intervals(
        t,
        logits,
        2 * d,
        single_jitter=True,
        domain=domain,
        generator=torch.Generator().manual_seed(999) if randomized else None,
    )
    w = torch.softmax(logits, -1)
    errors = []
    for i in range(n):
        masses = _cdf(ts[i], t[i], w[i]).diff()
        errors.append((masses - 1 / len(masses)).abs().sum())
    assert torch.stack(errors).mean() < 0.1


def test_proposal_resampling_loop_as_multinerf_models():
    """Two proposal levels then the NeRF level, in normalized distance s (models.py's loop)."""
    gen = torch.Generator().manual_seed(19)
    n_rays, num_samples = 64, (64, 64, 32)
    bias, mult, pad, anneal = 0.0025, 0.5, 0.0, 0.6
    s = torch.tensor([0.0, 1.0]).expand(n_rays, 2)
    w = torch.ones(n_rays, 1)
    prod = 1
    for level, ns in enumerate(num_samples):
        dilation = bias + mult * (1.0 - 0.0) / prod
        prod *= ns
        if level > 0:
            s, w = stepfun.max_dilate_weights(s, w, dilation, domain=(0.0, 1.0), renormalize=True)
            s, w = s[..., 1:-1], w[..., 1:-1]
        logits = torch.where(s[..., 1:] > s[..., :-1], anneal * torch.log(w + pad), -math.inf)
        s = stepfun.sample_intervals(s, logits, ns, single_jitter=True, domain=(0.0, 1.0), generator=gen)
        assert s.shape == (n_rays, ns + 1) and torch.isfinite(s).all()
        assert torch.all(s[:, 1:] >= s[:, :-1]) and torch.all(s >= 0) and torch.all(s <= 1)
        # Stand-in for the MLP's weights: a bump per ray.
        mid = 0.5 * (s[:, 1:] + s[:, :-1])
        w = torch.softmax(-(((mid - 0.3) / 0.05) ** 2), -1)


# ----------------------------------------------------------------------------
# The distortion loss (Eqs. 14-15) and interval distortion.


def _lossfun_distortion_quadratic(t, w):
    """The O(S^2) form of Eq. 15, written out (as multinerf's)."""
    mid = 0.5 * (t[..., 1:] + t[..., :-1])
    inter = (w[..., :, None] * w[..., None, :] * (mid[..., :, None] - mid[..., None, :]).abs()).sum((-1, -2))
    return inter + (w**2 * (t[..., 1:] - t[..., :-1])).sum(-1) / 3


def test_lossfun_distortion_matches_brute_force_double_integral():
    gen = torch.Generator().manual_seed(20)
    t = _sorted_uniform(gen, (3, 9))
    w = _softmax_weights(gen, (3, 8))
    loss = stepfun.lossfun_distortion(t, w)
    for m in (100, 400):  # Cells per interval.
        for b in range(3):
            # Midpoint rule for the double integral of p(x) p(y) |x - y| on m cells per interval.
            edges = torch.cat(
                [torch.linspace(0, 1, m + 1, dtype=f64)[:-1] * d + t0 for t0, d in zip(t[b], t[b].diff())]
            )
            edges = torch.cat([edges, t[b, -1:]])
            x = 0.5 * (edges[1:] + edges[:-1])
            mass = stepfun.query(x, t[b], stepfun.weight_to_pdf(t[b], w[b])) * edges.diff()
            grid = (mass[:, None] * mass[None, :] * (x[:, None] - x[None, :]).abs()).sum()
            # On two different cells |x - y| is linear, where the midpoint rule is exact; a cell
            # with itself should add mass^2 width / 3, which the rule misses: the whole error.
            missing = (mass**2 * edges.diff()).sum() / 3
            assert 0 <= loss[b] - grid <= missing * (1 + 1e-9) + 1e-15
            assert (loss[b] - grid) / loss[b] < 1 / m
            torch.testing.assert_close(grid + missing, loss[b], rtol=1e-10, atol=0)


def test_lossfun_distortion_matches_pairwise_forms_and_closed_forms():
    gen = torch.Generator().manual_seed(21)
    t = _sorted_uniform(gen, (5, 4, 33))
    w = _softmax_weights(gen, (5, 4, 32))
    loss = stepfun.lossfun_distortion(t, w)
    assert loss.shape == (5, 4)
    torch.testing.assert_close(loss, _lossfun_distortion_quadratic(t, w))
    # The mean interval distortion of every pair of intervals, weighted (multinerf's test).
    d = stepfun.interval_distortion(t[..., :-1, None], t[..., 1:, None], t[..., None, :-1], t[..., None, 1:])
    torch.testing.assert_close(loss, (w[..., :, None] * w[..., None, :] * d).sum((-1, -2)))

    def one(t_, w_):
        return stepfun.lossfun_distortion(torch.tensor(t_, dtype=f64), torch.tensor(w_, dtype=f64)).item()

    assert one([1.0, 4.0], [1.0]) == pytest.approx(1.0)  # (b - a) / 3.
    assert one([0.0, 1.0, 2.0], [0.5, 0.5]) == pytest.approx(2 / 3)  # E|x - y| on U[0, 2].
    assert one([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.0]) == pytest.approx(1 / 3)  # All mass in one bin.
    assert one([0.0, 1e-6, 10.0, 10.0 + 1e-6], [0.5, 0.0, 0.5]) == pytest.approx(5.0, rel=1e-6)  # Two spikes 10 apart.
    # Translation-invariant: the O(S) form works on gaps only.
    torch.testing.assert_close(stepfun.lossfun_distortion(t + 1e6, w), loss, rtol=1e-9, atol=0)


def test_lossfun_distortion_matches_monte_carlo():
    gen = torch.Generator().manual_seed(22)
    t = _sorted_uniform(gen, (4, 9))
    logits = 2 * torch.randn(4, 8, generator=gen, dtype=f64)
    loss = stepfun.lossfun_distortion(t, torch.softmax(logits, -1))
    n = 400_000
    x = stepfun.sample(t, logits, n, generator=gen)
    y = x[:, torch.randperm(n, generator=gen)]
    diffs = (x - y).abs()
    se = diffs.std(-1) / math.sqrt(n)
    assert torch.all((diffs.mean(-1) - loss).abs() < 5 * se)


def test_lossfun_distortion_gradcheck_and_finite_gradients_at_extremes():
    gen = torch.Generator().manual_seed(23)
    t = _sorted_uniform(gen, (2, 7)).requires_grad_(True)
    w = _softmax_weights(gen, (2, 6)).requires_grad_(True)
    assert torch.autograd.gradcheck(stepfun.lossfun_distortion, (t, w))
    # Gradients equal those of the O(S^2) form.
    g = torch.autograd.grad(stepfun.lossfun_distortion(t, w).sum(), (t, w))
    g_ref = torch.autograd.grad(_lossfun_distortion_quadratic(t, w).sum(), (t, w))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    cases = [
        (torch.linspace(1e6, 1e6 + 1, 9), torch.full((8,), 1 / 8)),  # Far from the origin.
        (torch.linspace(0, 8e-9, 9), torch.full((8,), 1 / 8)),  # Tiny intervals.
        (torch.linspace(0, 1e7, 9), torch.full((8,), 1 / 8)),  # Huge intervals.
        (torch.linspace(0, 1, 9), torch.zeros(8)),  # No weight.
        (torch.linspace(0, 1, 9), torch.eye(8)[3]),  # All mass in one bin.
        (torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 2.0]), torch.full((8,), 1 / 8)),  # Zero widths.
    ]
    for tc, wc in cases:
        tc, wc = tc.requires_grad_(True), wc.clone().requires_grad_(True)
        loss = stepfun.lossfun_distortion(tc, wc)
        grads = torch.autograd.grad(loss, (tc, wc))
        assert torch.isfinite(loss) and all(torch.isfinite(gr).all() for gr in grads)


def test_interval_distortion_matches_brute_force_and_closed_forms():
    gen = torch.Generator().manual_seed(24)
    t0 = _sorted_uniform(gen, (3, 8))
    t1 = _sorted_uniform(gen, (3, 8))
    d = stepfun.interval_distortion(t0[:, :-1], t0[:, 1:], t1[:, :-1], t1[:, 1:])
    for i in range(3):
        for j in range(7):
            x = torch.linspace(t0[i, j], t0[i, j + 1], 2001, dtype=f64)
            y = torch.linspace(t1[i, j], t1[i, j + 1], 2001, dtype=f64)
            brute = (x[:, None] - y[None, :]).abs().mean()
            torch.testing.assert_close(d[i, j], brute, rtol=1e-3, atol=1e-6)

    def dist(a0, a1, b0, b1):
        args = [torch.tensor(v, dtype=f64, requires_grad=True) for v in (a0, a1, b0, b1)]
        out = stepfun.interval_distortion(*args)
        grads = torch.autograd.grad(out, args)
        assert all(torch.isfinite(g) for g in grads)
        return out.item()

    assert dist(0.0, 3.0, 0.0, 3.0) == pytest.approx(1.0)  # Identical: width / 3.
    assert dist(0.0, 1.0, 5.0, 7.0) == pytest.approx(5.5)  # Disjoint: the midpoints' distance.
    assert dist(0.0, 1.0, 1.0, 2.0) == pytest.approx(1.0)  # Touching.
    assert dist(0.0, 2.0, 1.0, 1.0) == pytest.approx(0.5)  # A point inside: ((x-a)^2 + (b-x)^2) / 2(b-a).
    assert dist(1.0, 1.0, 0.0, 4.0) == pytest.approx(1.25)
    assert dist(2.0, 2.0, 2.0, 2.0) == 0.0  # Two equal points.
    assert dist(0.0, 4.0, 1.0, 2.0) == pytest.approx(dist(1.0, 2.0, 0.0, 4.0))  # Symmetric.


# ----------------------------------------------------------------------------
# Percentiles, shapes, dtypes and devices.


def test_weighted_percentile_inverts_the_cdf_and_matches_samples():
    gen = torch.Generator().manual_seed(25)
    ps = [1.0, 5.0, 50.0, 95.0, 99.5]
    t = torch.sort(torch.randn(3, 4, 21, generator=gen, dtype=f64), -1).values
    w = _softmax_weights(gen, (3, 4, 20), 1.0)
    q = stepfun.weighted_percentile(t, w, ps)
    assert q.shape == (3, 4, 5)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(_cdf(q[i, j], t[i, j], w[i, j]), torch.tensor(ps, dtype=f64) / 100)
            torch.testing.assert_close(stepfun.weighted_percentile(t[i, j], w[i, j], ps), q[i, j])
    s = stepfun.sample(t[0, 0], torch.log(w[0, 0]), 1_000_001)
    torch.testing.assert_close(torch.quantile(s, torch.tensor(ps, dtype=f64) / 100), q[0, 0], rtol=1e-4, atol=1e-4)
    # Uniform on one interval: a + (b - a) p / 100.
    torch.testing.assert_close(
        stepfun.weighted_percentile(torch.tensor([2.0, 6.0]), torch.tensor([1.0]), ps), 2 + 4 * torch.tensor(ps) / 100
    )


@pytest.mark.parametrize('dtype', [torch.float32, f64])
def test_every_function_keeps_dtype_device_and_batch_shape(dtype, device):
    gen = torch.Generator().manual_seed(26)
    kw = dict(dtype=dtype, device=device)
    t = _sorted_uniform(gen, (2, 3, 9), dtype=dtype).to(device)
    w = _softmax_weights(gen, (2, 3, 8), dtype=dtype).to(device)
    t_env = _sorted_uniform(gen, (2, 3, 6), dtype=dtype).to(device)
    w_env = _softmax_weights(gen, (2, 3, 5), dtype=dtype).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    outs = {
        'query': stepfun.query(t_env, t, w),
        'inner_outer': torch.stack(stepfun.inner_outer(t_env, t, w)),
        'lossfun_outer': stepfun.lossfun_outer(t, w, t_env, w_env),
        'max_dilate_weights': torch.cat(stepfun.max_dilate_weights(t, w, 0.1, renormalize=True), -1),
        'integrate_weights': stepfun.integrate_weights(w),
        'invert_cdf': stepfun.invert_cdf(torch.rand(2, 3, 7, **kw), t, torch.log(w)),
        'sample': stepfun.sample(t, torch.log(w), 7, generator=g),
        'sample_det': stepfun.sample(t, torch.log(w), 7, deterministic_center=True),
        'sample_intervals': stepfun.sample_intervals(t, torch.log(w), 7, domain=(-3.0, 3.0), generator=g),
        'lossfun_distortion': stepfun.lossfun_distortion(t, w),
        'interval_distortion': stepfun.interval_distortion(t[..., :-1], t[..., 1:], t[..., :-1], t[..., 1:]),
        'weighted_percentile': stepfun.weighted_percentile(t, w, [10, 50, 90]),
    }
    for name, out in outs.items():
        assert out.dtype == dtype and out.device.type == device.type, name
        assert out.shape[-3:-1] == (2, 3) or out.shape[:2] == (2, 3), name
        assert torch.isfinite(out).all(), name
    assert stepfun.searchsorted(t, t_env)[0].shape == (2, 3, 6)


def test_finite_gradients_of_sampling_dilation_and_outer_loss_at_extremes():
    for t, w in [
        (torch.tensor([1e-6, 1e-6 + 1e-9, 1.0, 1e6]), torch.tensor([0.0, 1.0, 0.0])),  # One-hot, tiny and huge bins.
        (torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0]), torch.tensor([0.5, 0.0, 0.5, 0.0])),  # Zero widths.
        (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 0.0])),  # No weight.
    ]:
        t, w = t.requires_grad_(True), w.clone().requires_grad_(True)
        logits = torch.where(t[1:] > t[:-1], torch.log(w + 1e-6), -math.inf)
        s = stepfun.sample_intervals(t, logits, 16, domain=(0.0, 1e6), generator=torch.Generator().manual_seed(0))
        td, wd = stepfun.max_dilate_weights(t, w, 0.01, domain=(0.0, 1e6), renormalize=True)
        loss = stepfun.lossfun_outer(t, w, td, wd).sum() + s.sum() + stepfun.lossfun_distortion(td, wd)
        grads = torch.autograd.grad(loss, (t, w))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
