"""Gradient truth tests of the ray math, in the spirit of nerfacc's test_grads.

The analytic gradients (autograd through `ray_utils`) are checked in float64
against central finite differences (`torch.autograd.gradcheck`), against
gradients derived by hand, and against the gradients of naive reference
implementations written here independently of `ray_utils` (the direct
moment integrals of a frustum, a per-sample loop of alpha compositing, a
per-frequency loop of the encodings). Extreme scales check that gradients
stay finite, and correct where their value is known.
"""

import pytest
import torch
from torch.autograd import gradcheck

from ray_utils import (
    cast_rays,
    conical_frustum_to_gaussian,
    cylinder_to_gaussian,
    integrated_pos_enc,
    lift_gaussian,
    pos_enc,
    volumetric_rendering,
)

f64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _intervals(n_rays, S, gen, near=0.5, far=6.0):
    """`[n_rays, S+1]` sorted endpoints in [near, far] with gaps of at least 1e-2."""
    gaps = 0.01 + torch.rand(n_rays, S, dtype=f64, generator=gen)
    t = torch.cat([torch.zeros(n_rays, 1, dtype=f64), torch.cumsum(gaps, -1)], -1)
    return near + (far - near) * t / t[:, -1:]


def _grads(outputs, inputs, seed=0):
    """Gradients of a fixed random linear functional of `outputs` (a vector-Jacobian product)."""
    gen = _gen(seed)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=gen)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs, retain_graph=True)


# ----------------------------------------------------------------------------
# Gaussians of frustums and cylinders.


def naive_frustum_gaussian(d, t0, t1, r):
    """Moments of a uniform density in the frustum from first principles, diagonal covariance.

    The cross-section at t has area proportional to t^2, so E[t^k] = 3/(k+3) *
    (t1^(k+3) - t0^(k+3)) / (t1^3 - t0^3); across the axis a uniform disk of
    radius r t has variance (r t)^2 / 4 per direction, so r_var = r^2 E[t^2] / 4.
    Exact in float64 away from t1 - t0 << t0.
    """

    def moment(k):
        return 3 / (k + 3) * (t1 ** (k + 3) - t0 ** (k + 3)) / (t1**3 - t0**3)

    t_mean, t_sq = moment(1), moment(2)
    t_var, r_var = t_sq - t_mean**2, r**2 * t_sq / 4
    u = d / torch.sqrt((d**2).sum(-1, keepdim=True))  # unit axis
    mean = d[..., None, :] * t_mean[..., None]
    cov = t_var[..., None] * (d**2)[..., None, :] + r_var[..., None] * (1 - u**2)[..., None, :]
    return mean, cov


@pytest.mark.parametrize('diag', [True, False])
def test_frustum_gaussian_gradients_match_finite_differences(diag):
    """d(mean, cov)/d(d, t0, t1, radius) of the stable frustum form equal central finite differences."""
    gen = _gen(0)
    t = _intervals(2, 3, gen)
    d = _leaf(torch.randn(2, 3, dtype=f64, generator=gen))
    t0, t1 = _leaf(t[:, :-1]), _leaf(t[:, 1:])
    r = _leaf(0.01 + torch.rand(2, 1, dtype=f64, generator=gen))
    assert gradcheck(lambda *a: conical_frustum_to_gaussian(*a, diag=diag, stable=True), (d, t0, t1, r))


def test_frustum_gradients_match_direct_moment_integrals():
    """The stable form's values and gradients equal those of the moment integrals E[t^k] computed directly."""
    gen = _gen(1)
    t = _intervals(16, 8, gen)
    d = _leaf(torch.randn(16, 3, dtype=f64, generator=gen))
    t0, t1 = _leaf(t[:, :-1]), _leaf(t[:, 1:])
    r = _leaf(torch.rand(16, 1, dtype=f64, generator=gen))
    inputs = (d, t0, t1, r)
    got = conical_frustum_to_gaussian(d, t0, t1, r, diag=True, stable=True)
    ref = naive_frustum_gaussian(d, t0, t1, r)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for seed in range(3):
        for g, g_ref in zip(_grads(got, inputs, seed), _grads(ref, inputs, seed), strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_narrow_frustum_gradients_survive_float32():
    """For t1 - t0 = 1e-5 t0 the float32 gradients of the stable form match float64 to 1e-4,
    where differentiating the direct form in float32 is off by orders of magnitude (about 1e5 times)."""
    d64 = torch.tensor([0.3, -1.2, 0.7], dtype=f64)
    t0_64 = torch.tensor([1000.0, 20.0, 3.0], dtype=f64)
    t1_64, r64 = t0_64 * (1 + 1e-5), torch.tensor([0.002], dtype=f64)

    def grads(dtype, stable):
        t0, t1, r = (_leaf(x.to(dtype)) for x in (t0_64, t1_64, r64))
        mean, cov = conical_frustum_to_gaussian(d64.to(dtype), t0, t1, r, diag=True, stable=stable)
        # The along-ray variance (t_var |d|^2 on the axis) is the cancellation-prone moment.
        return torch.autograd.grad(cov.sum() + mean.sum(), (t0, t1, r))

    ref = grads(f64, True)
    for g, g_ref in zip(grads(torch.float32, True), ref, strict=True):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=0)
    direct = grads(torch.float32, False)
    errors = [((g.double() - g_ref).abs() / g_ref.abs()).max().item() for g, g_ref in zip(direct, ref, strict=True)]
    assert max(errors) > 100


@pytest.mark.parametrize('diag', [True, False])
def test_cylinder_gaussian_gradients_match_finite_differences_and_hand_derivation(diag):
    """Cylinder moments: gradcheck, and the hand-derived d/dt0, d/dt1, d/dr of its diagonal
    (t_mean = (t0+t1)/2, t_var = (t1-t0)^2/12, r_var = r^2/4)."""
    gen = _gen(2)
    t = _intervals(3, 4, gen)
    d = _leaf(torch.randn(3, 3, dtype=f64, generator=gen))
    t0, t1 = _leaf(t[:, :-1]), _leaf(t[:, 1:])
    r = _leaf(0.01 + torch.rand(3, 1, dtype=f64, generator=gen))
    assert gradcheck(lambda *a: cylinder_to_gaussian(*a, diag=diag), (d, t0, t1, r))
    if diag:
        mean, cov = cylinder_to_gaussian(d, t0, t1, r, diag=True)
        g_t0, g_t1, g_r = torch.autograd.grad(cov.sum() + mean.sum(), (t0, t1, r))
        dsq = (d**2).sum(-1, keepdim=True)
        w = t1 - t0
        # sum_i cov_i = t_var |d|^2 + 2 r_var; sum_i mean_i = t_mean sum(d).
        torch.testing.assert_close(g_t0, -w / 6 * dsq + 0.5 * d.sum(-1, keepdim=True))
        torch.testing.assert_close(g_t1, w / 6 * dsq + 0.5 * d.sum(-1, keepdim=True))
        torch.testing.assert_close(g_r, 4 * r)  # 4 intervals, each d(2 r^2/4)/dr = r


@pytest.mark.parametrize('diag', [True, False])
def test_lift_gaussian_gradients(diag):
    """lift_gaussian: gradcheck in (d, t_mean, t_var, r_var), and the hand-derived gradients of
    trace(cov) = t_var |d|^2 + 2 r_var (the projector I - d d^T/|d|^2 has trace 2 whatever d is)."""
    gen = _gen(3)
    d = _leaf(torch.randn(2, 3, dtype=f64, generator=gen))
    t_mean, t_var, r_var = (_leaf(torch.rand(2, 4, dtype=f64, generator=gen) + 0.1) for _ in range(3))
    inputs = (d, t_mean, t_var, r_var)
    assert gradcheck(lambda *a: lift_gaussian(*a, diag=diag), inputs)
    mean, cov = lift_gaussian(*inputs, diag=diag)
    trace = cov.sum(-1) if diag else torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    g_d, g_tv, g_rv = torch.autograd.grad(trace.sum(), (d, t_var, r_var))
    torch.testing.assert_close(g_d, 2 * t_var.sum(-1, keepdim=True) * d)
    torch.testing.assert_close(g_tv, (d**2).sum(-1, keepdim=True).expand(2, 4))
    torch.testing.assert_close(g_rv, torch.full((2, 4), 2.0, dtype=f64))
    g_d, g_tm = torch.autograd.grad(mean.sum(), (d, t_mean))
    torch.testing.assert_close(g_d, t_mean.sum(-1, keepdim=True).expand(2, 3))
    torch.testing.assert_close(g_tm, d.sum(-1, keepdim=True).expand(2, 4))


@pytest.mark.parametrize('ray_shape', ['cone', 'cylinder'])
def test_cast_rays_gradients_are_banded_and_match_finite_differences(ray_shape):
    """cast_rays: gradcheck in (t_vals, origins, directions, radii); the mean moves rigidly with the
    origin (Jacobian = identity, covariance independent of it); section i depends on t_i and t_{i+1} only."""
    gen = _gen(4)
    S = 5
    t = _leaf(_intervals(2, S, gen))
    o = _leaf(torch.randn(2, 3, dtype=f64, generator=gen))
    d = _leaf(torch.randn(2, 3, dtype=f64, generator=gen))
    r = _leaf(0.01 + torch.rand(2, 1, dtype=f64, generator=gen))
    assert gradcheck(lambda *a: cast_rays(*a, ray_shape), (t, o, d, r))

    jac = torch.autograd.functional.jacobian(lambda o_: cast_rays(t[0], o_, d[0], r[0], ray_shape), o[0])
    torch.testing.assert_close(jac[0], torch.eye(3, dtype=f64).expand(S, 3, 3))
    assert torch.all(jac[1] == 0)
    jac_mean, jac_cov = torch.autograd.functional.jacobian(lambda t_: cast_rays(t_, o[0], d[0], r[0], ray_shape), t[0])
    for jac in (jac_mean, jac_cov):  # [S, 3, S+1]
        nonzero = (jac != 0).any(1)  # [S, S+1]: does section i move with t_j?
        expected = torch.zeros(S, S + 1, dtype=torch.bool)
        expected[torch.arange(S), torch.arange(S)] = True
        expected[torch.arange(S), torch.arange(S) + 1] = True
        assert torch.equal(nonzero, expected)


# ----------------------------------------------------------------------------
# Positional encodings.


def naive_ipe(mean, var, min_deg, max_deg):
    """E[sin], E[cos] of 2^deg x for x ~ N(mean, var), one (degree, coordinate) at a time, sin block first."""
    sins, coss = [], []
    for deg in range(min_deg, max_deg):
        a = 2.0**deg
        for c in range(mean.shape[-1]):
            damp = torch.exp(-0.5 * a**2 * var[..., c])
            sins.append(damp * torch.sin(a * mean[..., c]))
            coss.append(damp * torch.cos(a * mean[..., c]))
    return torch.stack(sins + coss, -1)


def test_ipe_gradients_match_finite_differences_and_naive_loop():
    """IPE: gradcheck in (mean, cov_diag), and gradients equal those of a per-frequency loop of
    exp(-a^2 var / 2) sin(a mu), exp(-a^2 var / 2) cos(a mu)."""
    gen = _gen(5)
    mean = _leaf(torch.randn(4, 3, dtype=f64, generator=gen))
    var = _leaf(0.05 * torch.rand(4, 3, dtype=f64, generator=gen))
    assert gradcheck(lambda m, v: integrated_pos_enc(m, v, 0, 4), (mean, var))
    mean2 = _leaf(torch.randn(32, 3, dtype=f64, generator=gen))
    var2 = _leaf(torch.rand(32, 3, dtype=f64, generator=gen) * 1e-3)
    got, ref = integrated_pos_enc(mean2, var2, 0, 10), naive_ipe(mean2, var2, 0, 10)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    for g, g_ref in zip(_grads([got], (mean2, var2)), _grads([ref], (mean2, var2)), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_ipe_gradients_by_hand():
    """d/dmu and d/dvar of one IPE feature: a e cos(a mu) and -a^2/2 e sin(a mu) for sin,
    -a e sin(a mu) and -a^2/2 e cos(a mu) for cos, with e = exp(-a^2 var / 2); no cross-coordinate terms."""
    mu = torch.tensor([0.7, -1.3, 2.1], dtype=f64)
    var = torch.tensor([0.01, 0.002, 0.03], dtype=f64)
    jm, jv = torch.autograd.functional.jacobian(lambda m, v: integrated_pos_enc(m, v, 0, 3), (mu, var))
    L = 3
    for deg in range(L):
        a = 2.0**deg
        e = torch.exp(-0.5 * a**2 * var)
        rows_sin = slice(3 * deg, 3 * deg + 3)
        rows_cos = slice(3 * L + 3 * deg, 3 * L + 3 * deg + 3)
        torch.testing.assert_close(jm[rows_sin], torch.diag(a * e * torch.cos(a * mu)))
        torch.testing.assert_close(jm[rows_cos], torch.diag(-a * e * torch.sin(a * mu)))
        torch.testing.assert_close(jv[rows_sin], torch.diag(-0.5 * a**2 * e * torch.sin(a * mu)))
        torch.testing.assert_close(jv[rows_cos], torch.diag(-0.5 * a**2 * e * torch.cos(a * mu)))


@pytest.mark.parametrize('append_identity', [True, False])
def test_pos_enc_jacobian_by_hand(append_identity):
    """PE: gradcheck, and its Jacobian is [I; diag(2^deg cos(2^deg x)); diag(-2^deg sin(2^deg x))] in the
    output order [x, sin block, cos block], each block ordered (degree, coordinate)."""
    x = torch.tensor([0.4, -2.2, 1.7], dtype=f64)
    assert gradcheck(lambda x_: pos_enc(x_, 0, 5, append_identity), (_leaf(x[None]),))
    jac = torch.autograd.functional.jacobian(lambda x_: pos_enc(x_, 1, 5, append_identity), x)
    blocks_sin = [torch.diag(2.0**deg * torch.cos(2.0**deg * x)) for deg in range(1, 5)]
    blocks_cos = [torch.diag(-(2.0**deg) * torch.sin(2.0**deg * x)) for deg in range(1, 5)]
    expected = torch.cat(([torch.eye(3, dtype=f64)] if append_identity else []) + blocks_sin + blocks_cos)
    torch.testing.assert_close(jac, expected)


def test_ipe_gradient_limits():
    """At zero variance d IPE/d mean is the PE's; at a huge variance (or degree 16 with a
    moderate one) every feature and gradient is 0, finite in float32 too."""
    gen = _gen(6)
    mean = torch.randn(8, 3, dtype=f64, generator=gen)
    jac_ipe = torch.autograd.functional.jacobian(lambda m: integrated_pos_enc(m, torch.zeros_like(m), 0, 6), mean[0])
    jac_pe = torch.autograd.functional.jacobian(lambda m: pos_enc(m, 0, 6, append_identity=False), mean[0])
    torch.testing.assert_close(jac_ipe, jac_pe)
    for dtype in (torch.float32, f64):
        m = _leaf((mean * 1e4).to(dtype))
        v = _leaf(torch.full((8, 3), 1e4, dtype=dtype))
        enc = integrated_pos_enc(m, v, 0, 17)
        g_m, g_v = torch.autograd.grad(enc.sum(), (m, v))
        assert torch.all(enc == 0) and torch.all(g_m == 0) and torch.all(g_v == 0)
        v = _leaf(torch.full((8, 3), 1e-3, dtype=dtype))
        enc = integrated_pos_enc(m, v, 0, 17)
        g_m, g_v = torch.autograd.grad(enc.sum(), (m, v))
        assert torch.isfinite(g_m).all() and torch.isfinite(g_v).all()
        assert torch.all(enc[..., 3 * 12 : 3 * 17] == 0) and torch.all(enc[..., 3 * 29 :] == 0)


# ----------------------------------------------------------------------------
# Volume rendering.


def naive_render(rgb, density, t_vals, dirs, white_bkgd):
    """Alpha compositing one ray and one sample at a time, as written in the NeRF paper.

    delta_i = (t_{i+1} - t_i) |d| (no extra last interval: the S intervals are the
    S samples, as the official mip-NeRF), alpha_i = 1 - exp(-density_i delta_i),
    w_i = alpha_i prod_{j<i} (1 - alpha_j); distance = sum w_i t_mid_i / sum w_i,
    t_near where nothing is hit, clipped to [t_near, t_far].
    """
    comps, dists, accs, weights = [], [], [], []
    for ray in range(rgb.shape[0]):
        t = t_vals[ray]
        norm = torch.sqrt((dirs[ray] ** 2).sum())
        trans, ws = 1.0, []
        for i in range(rgb.shape[1]):
            alpha = 1 - torch.exp(-density[ray, i] * (t[i + 1] - t[i]) * norm)
            ws.append(alpha * trans)
            trans = trans * (1 - alpha)
        w = torch.stack(ws)
        acc = w.sum()
        comp = sum(w[i] * rgb[ray, i] for i in range(len(ws)))
        if white_bkgd:
            comp = comp + (1 - acc)
        dist = (w * 0.5 * (t[1:] + t[:-1])).sum() / acc if acc > 0 else t[0]
        comps.append(comp)
        dists.append(torch.clamp(dist, t[0], t[-1]))
        accs.append(acc)
        weights.append(w)
    return torch.stack(comps), torch.stack(dists), torch.stack(accs), torch.stack(weights)


def _render_inputs(n_rays, S, seed, density_scale=1.0):
    gen = _gen(seed)
    rgb = _leaf(torch.rand(n_rays, S, 3, dtype=f64, generator=gen))
    density = _leaf(density_scale * torch.rand(n_rays, S, dtype=f64, generator=gen))
    t = _leaf(_intervals(n_rays, S, gen, near=2.0, far=6.0))
    dirs = _leaf(torch.randn(n_rays, 3, dtype=f64, generator=gen))
    return rgb, density, t, dirs


def test_volume_rendering_gradients_match_finite_differences():
    """d(comp_rgb, distance, acc, weights)/d(rgb, density, t_vals, dirs) equal central finite differences."""
    inputs = _render_inputs(2, 5, seed=7)
    for white in (True, False):
        assert gradcheck(lambda *a, white=white: volumetric_rendering(*a, white), inputs)


@pytest.mark.parametrize('white_bkgd', [True, False])
def test_volume_rendering_matches_naive_loop_values_and_gradients(white_bkgd):
    """Outputs and gradients w.r.t. rgb, density, t_vals and dirs equal those of the per-sample loop,
    including a ray with no density at all (distance = near, gradients finite)."""
    rgb, density, t, dirs = _render_inputs(6, 12, seed=8, density_scale=2.0)
    with torch.no_grad():
        density[1] = 0.0  # an empty ray
        density[2, :5] = 0.0  # empty then dense
        density[3, 7] = 50.0  # an opaque wall mid-ray
    inputs = (rgb, density, t, dirs)
    got = volumetric_rendering(*inputs, white_bkgd)
    ref = naive_render(*inputs, white_bkgd)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert got[1][1] == t[1, 0]
    for seed in range(3):
        for g, g_ref in zip(_grads(got, inputs, seed), _grads(ref, inputs, seed), strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_volume_rendering_gradients_by_hand():
    """d comp_rgb_c / d rgb_ic = w_i; d acc / d density_i = delta_i (1 - acc), since
    acc = 1 - exp(-sum_j density_j delta_j); d acc / d rgb = 0."""
    rgb, density, t, dirs = _render_inputs(4, 10, seed=9)
    comp, _, acc, w = volumetric_rendering(rgb, density, t, dirs, white_bkgd=True)
    for c in range(3):
        (g_rgb,) = torch.autograd.grad(comp[:, c].sum(), rgb, retain_graph=True)
        torch.testing.assert_close(g_rgb[..., c], w)
        assert torch.all(g_rgb[..., [k for k in range(3) if k != c]] == 0)
    g_density, g_rgb = torch.autograd.grad(acc.sum(), (density, rgb), allow_unused=True)
    delta = (t[:, 1:] - t[:, :-1]) * dirs.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(g_density, delta * (1 - acc[:, None]))
    assert g_rgb is None or torch.all(g_rgb == 0)


@pytest.mark.parametrize('dtype', [torch.float32, f64], ids=['float32', 'float64'])
def test_volume_rendering_gradients_at_extreme_densities(dtype):
    """Density 0: acc = 0, d acc/d density_i = delta_i exactly, no NaN from the 0/0 distance.
    Density 1e30 (or 3e38) in one sample: it takes all the weight, samples behind it get zero
    gradient, and every gradient is finite; zero-width intervals and very far t likewise."""
    S = 8
    t = torch.linspace(2.0, 6.0, S + 1, dtype=dtype).expand(5, S + 1).clone()
    t[3, 1:4] = t[3, 1]  # zero-width intervals
    t[4] = torch.linspace(1e4, 1e5, S + 1, dtype=dtype)  # very far
    density = torch.ones(5, S, dtype=dtype)
    density[0] = 0.0
    density[1, :2], density[1, 2] = 0.0, 1e30
    density[2, 0] = 3e38
    rgb = _leaf(torch.rand(5, S, 3, generator=_gen(10), dtype=f64).to(dtype))
    density, t = _leaf(density), _leaf(t)
    dirs = _leaf(torch.tensor([[0.3, -1.2, 0.7]], dtype=dtype).expand(5, 3))
    comp, dist, acc, w = volumetric_rendering(rgb, density, t, dirs, white_bkgd=True)
    grads = torch.autograd.grad(
        comp.sum() + dist.sum() + acc.sum() + w.sum(), (rgb, density, t, dirs), retain_graph=True
    )
    assert all(torch.isfinite(g).all() for g in grads)
    (g_acc,) = torch.autograd.grad(acc[0], density)
    delta0 = (t[0, 1:] - t[0, :-1]) * dirs[0].norm()
    assert acc[0] == 0 and dist[0] == 2.0
    torch.testing.assert_close(g_acc[0], delta0)
    for ray, k in ((1, 2), (2, 0)):
        assert w[ray, k] == 1 and torch.all(w[ray, k + 1 :] == 0)
        (g_rgb,) = torch.autograd.grad(comp[ray].sum(), rgb, retain_graph=True)
        assert torch.all(g_rgb[ray, k + 1 :] == 0) and torch.all(g_rgb[ray, k] == 1)
