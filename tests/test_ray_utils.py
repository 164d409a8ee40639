"""Truth tests of the mip-NeRF math, in the spirit of the official mip_test.py.

Closed forms are compared with Monte-Carlo estimates from 100k+ random
samples; tolerances are a few standard errors of those estimates.
"""

import math

import pytest
import torch

import ray_utils
from ray_utils import (
    cast_rays,
    conical_frustum_to_gaussian,
    cylinder_to_gaussian,
    integrated_pos_enc,
    pos_enc,
    resample_along_rays,
    sample_along_rays,
    sorted_piecewise_constant_pdf,
    volumetric_rendering,
)

N_MC = 400_000
f64 = torch.float64


def _perp_basis(d):
    """Two unit vectors orthogonal to d and to each other."""
    d = d / d.norm()
    a = (
        torch.tensor([1.0, 0.0, 0.0], dtype=d.dtype)
        if abs(d[0]) < 0.9
        else torch.tensor([0.0, 1.0, 0.0], dtype=d.dtype)
    )
    e1 = torch.linalg.cross(d, a)
    e1 = e1 / e1.norm()
    return e1, torch.linalg.cross(d, e1)


def _sample_solid(d, t0, t1, radius, shape, n, gen):
    """Uniform samples in a conical frustum (radius `radius * t`) or a cylinder."""
    u = torch.rand(n, dtype=f64, generator=gen)
    if shape == 'cone':  # density of t is proportional to t^2 (cross-section area)
        t = (t0**3 + u * (t1**3 - t0**3)) ** (1 / 3)
        r_max = radius * t
    else:
        t = t0 + u * (t1 - t0)
        r_max = radius * torch.ones_like(t)
    r = r_max * torch.sqrt(torch.rand(n, dtype=f64, generator=gen))
    theta = 2 * math.pi * torch.rand(n, dtype=f64, generator=gen)
    e1, e2 = _perp_basis(d)
    return t[:, None] * d + (r * torch.cos(theta))[:, None] * e1 + (r * torch.sin(theta))[:, None] * e2


CASES = [  # (t0, t1, radius): narrow/wide, near/far
    (1.0, 1.1, 0.002),
    (1.0, 3.0, 0.002),
    (5.0, 5.5, 0.05),
    (0.2, 6.0, 0.3),
    (40.0, 41.0, 0.01),
]


@pytest.mark.parametrize('shape', ['cone', 'cylinder'])
@pytest.mark.parametrize('t0,t1,radius', CASES)
def test_gaussian_matches_monte_carlo_moments(shape, t0, t1, radius):
    gen = torch.Generator().manual_seed(0)
    d = torch.tensor([0.3, -1.2, 0.7], dtype=f64)  # deliberately not unit length
    x = _sample_solid(d, t0, t1, radius, shape, N_MC, gen)
    mc_mean, mc_cov = x.mean(0), torch.cov(x.T)

    fn = conical_frustum_to_gaussian if shape == 'cone' else cylinder_to_gaussian
    t0_, t1_, r_ = (torch.tensor([v], dtype=f64) for v in (t0, t1, radius))
    mean, cov = fn(d, t0_, t1_, r_, diag=False)
    mean_d, cov_d = fn(d, t0_, t1_, r_, diag=True)
    mean, cov, cov_d = mean[0], cov[0], cov_d[0]

    std = torch.sqrt(torch.diagonal(mc_cov))
    assert torch.all((mean - mc_mean).abs() < 5 * std / math.sqrt(N_MC) + 1e-12)
    # Standard error of a covariance entry is about sqrt((s_ii s_jj + s_ij^2) / N).
    se = torch.sqrt((std[:, None] ** 2 * std[None, :] ** 2 + mc_cov**2) / N_MC)
    assert torch.all((cov - mc_cov).abs() < 6 * se + 1e-12)
    torch.testing.assert_close(mean_d[0], mean)
    torch.testing.assert_close(cov_d, torch.diagonal(cov))


def test_stable_frustum_formula_survives_float32_where_direct_form_fails():
    d = torch.tensor([0.0, 0.0, 1.0])
    t0, t1, r = torch.tensor([1000.0]), torch.tensor([1000.01]), torch.tensor([0.001])
    ref = conical_frustum_to_gaussian(d.double(), t0.double(), t1.double(), r.double(), diag=True, stable=True)
    stable = conical_frustum_to_gaussian(d, t0, t1, r, diag=True, stable=True)
    direct = conical_frustum_to_gaussian(d, t0, t1, r, diag=True, stable=False)
    # The along-ray variance (hw^2 / 3 ~ 8e-6) is exact in the stable form ...
    torch.testing.assert_close(stable[1].double(), ref[1], rtol=1e-3, atol=0)
    # ... and destroyed by cancellation in the direct form.
    assert (direct[1][..., 2].double() - ref[1][..., 2]).abs().item() > 1e-3
    # In float64 both forms agree on a well-conditioned interval.
    a = conical_frustum_to_gaussian(
        d.double(),
        torch.tensor([1.0], dtype=f64),
        torch.tensor([2.0], dtype=f64),
        torch.tensor([0.1], dtype=f64),
        diag=False,
        stable=True,
    )
    b = conical_frustum_to_gaussian(
        d.double(),
        torch.tensor([1.0], dtype=f64),
        torch.tensor([2.0], dtype=f64),
        torch.tensor([0.1], dtype=f64),
        diag=False,
        stable=False,
    )
    torch.testing.assert_close(a, b)


def test_cast_rays_batch_shapes_and_origin_shift():
    gen = torch.Generator().manual_seed(1)
    o = torch.randn(2, 5, 3, generator=gen)
    d = torch.randn(2, 5, 3, generator=gen)
    r = torch.rand(2, 5, 1, generator=gen)
    t = torch.sort(torch.rand(2, 5, 9, generator=gen) * 4 + 1, dim=-1).values
    mean, cov = cast_rays(t, o, d, r, 'cone')
    assert mean.shape == (2, 5, 8, 3) and cov.shape == (2, 5, 8, 3)
    mean0, cov0 = cast_rays(t, torch.zeros_like(o), d, r, 'cone')
    torch.testing.assert_close(mean, mean0 + o[..., None, :])
    torch.testing.assert_close(cov, cov0)
    mean_f, cov_f = cast_rays(t, o, d, r, 'cylinder', diag=False)
    assert cov_f.shape == (2, 5, 8, 3, 3)
    with pytest.raises(ValueError):
        cast_rays(t, o, d, r, 'sphere')


@pytest.mark.parametrize('var_scale', [1e-4, 1e-2, 1.0, 10.0])
def test_ipe_matches_monte_carlo(var_scale):
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(4, 3, dtype=f64, generator=gen)
    var = torch.rand(4, 3, dtype=f64, generator=gen) * var_scale
    x = mean + torch.sqrt(var) * torch.randn(100_000, 4, 3, dtype=f64, generator=gen)
    mc = pos_enc(x, 0, 6, append_identity=False).mean(0)
    ipe = integrated_pos_enc(mean, var, 0, 6)
    assert ipe.shape == (4, 2 * 3 * 6)
    assert (ipe - mc).abs().max() < 5 / math.sqrt(100_000)


def test_ipe_with_zero_variance_is_pe_and_layout_is_sin_then_cos():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, generator=gen)
    ipe = integrated_pos_enc(x, torch.zeros_like(x), 2, 5)
    pe = pos_enc(x, 2, 5, append_identity=False)
    torch.testing.assert_close(ipe, pe)
    # Feature (degree l, coordinate c) sits at l * 3 + c in the sin block.
    deg, c = 1, 2
    torch.testing.assert_close(ipe[:, deg * 3 + c], torch.sin(2 ** (2 + deg) * x[:, c]))
    torch.testing.assert_close(ipe[:, 9 + deg * 3 + c], torch.cos(2 ** (2 + deg) * x[:, c]))
    pe_id = pos_enc(x, 0, 4, append_identity=True)
    assert pe_id.shape == (7, 3 + 2 * 3 * 4)
    torch.testing.assert_close(pe_id[:, :3], x)


def test_ipe_damps_high_frequencies_of_wide_gaussians():
    mean = torch.zeros(1, 3)
    wide = integrated_pos_enc(mean + 0.3, torch.full((1, 3), 1.0), 0, 16)
    assert wide[:, 3 * 4 : 3 * 16].abs().max() < 1e-6  # degrees >= 4 vanish


def _rays(batch_shape, gen, dtype=torch.float32, device='cpu'):
    o = torch.randn(batch_shape + (3,), generator=gen, dtype=dtype).to(device)
    d = torch.randn(batch_shape + (3,), generator=gen, dtype=dtype).to(device)
    r = (torch.rand(batch_shape + (1,), generator=gen, dtype=dtype) * 0.01).to(device)
    near = torch.full(batch_shape + (1,), 2.0, dtype=dtype, device=device)
    far = torch.full(batch_shape + (1,), 6.0, dtype=dtype, device=device)
    return o, d, r, near, far


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_sample_along_rays(dtype, device):
    gen = torch.Generator().manual_seed(4)
    o, d, r, near, far = _rays((3, 4), gen, dtype, device)
    t, (mean, cov) = sample_along_rays(o, d, r, 16, near, far, False, False, 'cone')
    assert t.shape == (3, 4, 17) and mean.shape == (3, 4, 16, 3) and cov.shape == (3, 4, 16, 3)
    assert t.dtype == dtype and t.device.type == device.type
    torch.testing.assert_close(t[0, 0], torch.linspace(2, 6, 17, dtype=dtype, device=device))
    t_r, _ = sample_along_rays(o, d, r, 16, near, far, True, False, 'cone')
    assert torch.all(t_r[..., 1:] >= t_r[..., :-1]) and t_r.min() >= 2 and t_r.max() <= 6
    # Each endpoint stays within its stratum (half an interval either side).
    assert ((t_r - t).abs() <= 0.125 + 1e-6).all() and not torch.equal(t_r, t)
    t_l, _ = sample_along_rays(o, d, r, 16, near, far, False, True, 'cylinder')
    inv = 1 / t_l[0, 0]
    torch.testing.assert_close(inv[1:] - inv[:-1], torch.full_like(inv[1:], (1 / 6 - 1 / 2) / 16))


def _histogram(samples, bins):
    idx = torch.searchsorted(bins.contiguous(), samples.contiguous(), right=True) - 1
    return torch.bincount(idx.clamp(0, bins.numel() - 2).flatten(), minlength=bins.numel() - 1).double()


@pytest.mark.parametrize('randomized', [True, False])
def test_piecewise_constant_pdf_follows_weights(randomized):
    gen = torch.Generator().manual_seed(5)
    nb = 12
    bins = torch.cat([torch.zeros(1), torch.cumsum(torch.rand(nb, generator=gen) + 0.1, 0)])
    weights = torch.rand(nb, generator=gen)
    weights[[2, 7]] = 0.0
    n_rays, n = 2000, 64
    s = sorted_piecewise_constant_pdf(bins.expand(n_rays, -1), weights.expand(n_rays, -1), n, randomized, gen)
    assert s.shape == (n_rays, n)
    assert torch.all(s[:, 1:] >= s[:, :-1]) and s.min() >= bins[0] and s.max() <= bins[-1]
    frac = _histogram(s, bins) / s.numel()
    expected = (weights / weights.sum()).double()
    tol = 1 / n if not randomized else 5 * torch.sqrt(expected * (1 - expected) / s.numel()) + 1 / (n * n_rays)
    assert torch.all((frac - expected).abs() <= tol + 1e-9)
    # Zero-weight bins get nothing (except samples exactly at their left edge).
    assert frac[2] < 1e-3 and frac[7] < 1e-3


def test_piecewise_constant_pdf_all_zero_weights_is_uniform():
    gen = torch.Generator().manual_seed(6)
    bins = torch.linspace(2, 6, 9)
    s = sorted_piecewise_constant_pdf(bins.expand(5000, -1), torch.zeros(5000, 8), 32, True, gen)
    assert torch.isfinite(s).all()
    frac = _histogram(s, bins) / s.numel()
    assert torch.all((frac - 1 / 8).abs() < 0.01)


def test_resample_concentrates_on_blurred_peak_and_stops_gradients():
    gen = torch.Generator().manual_seed(7)
    n_rays, S, k = 4000, 128, 60
    o, d, r, near, far = _rays((n_rays,), gen)
    t, _ = sample_along_rays(o, d, r, S, near, far, False, False, 'cone')
    weights = torch.zeros(n_rays, S)
    weights[:, k] = 1.0
    weights.requires_grad_(True)
    new_t, (mean, cov) = resample_along_rays(o, d, r, t, weights, True, 'cone', 0.01, generator=gen)
    assert new_t.shape == (n_rays, S + 1) and not new_t.requires_grad
    assert torch.all(new_t[:, 1:] >= new_t[:, :-1])
    assert torch.all(new_t >= near) and torch.all(new_t <= far)
    # Blurpool turns the spike into 0.5, 1, 0.5 on bins k-1..k+1; padding adds 0.01 per bin.
    in_peak = ((new_t >= t[:, k - 1 : k]) & (new_t < t[:, k + 2 : k + 3])).double().mean()
    expected = (2 + 3 * 0.01) / (2 + S * 0.01)
    assert abs(in_peak - expected) < 0.01
    # No pile-up at the far plane (the "u added twice" bug put half the samples there).
    assert (new_t > 5.9).double().mean() < 0.02


def test_volume_rendering_of_constant_slab_is_analytic():
    S = 4000
    t = torch.linspace(2.0, 6.0, S + 1, dtype=f64)[None]
    mids = 0.5 * (t[:, 1:] + t[:, :-1])
    a, b, sigma = 3.0, 4.0, 1.7
    density = torch.where((mids > a) & (mids < b), sigma, 0.0).to(f64)
    rgb = torch.tensor([0.2, 0.5, 0.9], dtype=f64).expand(1, S, 3)
    for dir_norm in (1.0, 2.0):
        dirs = torch.tensor([[0.0, 0.0, dir_norm]], dtype=f64)
        comp, dist, acc, w = volumetric_rendering(rgb, density, t, dirs, white_bkgd=True)
        k = sigma * dir_norm  # density per unit t
        opacity = 1 - math.exp(-k * (b - a))
        depth = a + 1 / k - (b - a) * math.exp(-k * (b - a)) / opacity  # E[t | hit]
        assert abs(acc.item() - opacity) < 1e-3
        torch.testing.assert_close(comp[0], rgb[0, 0] * opacity + (1 - opacity), atol=1e-3, rtol=0)
        assert abs(dist.item() - depth) < 2e-3
        assert abs(w.sum().item() - acc.item()) < 1e-12


def test_volume_rendering_empty_and_opaque():
    t = torch.linspace(2.0, 6.0, 9).expand(3, 9)
    dirs = torch.randn(3, 3)
    rgb = torch.rand(3, 8, 3)
    comp, dist, acc, _ = volumetric_rendering(rgb, torch.zeros(3, 8), t, dirs, white_bkgd=True)
    torch.testing.assert_close(comp, torch.ones(3, 3))
    torch.testing.assert_close(dist, torch.full((3,), 2.0))  # near where nothing is hit, as the official release
    assert torch.all(acc == 0)
    density = torch.zeros(3, 8)
    density[:, 3] = 1e6
    comp, dist, acc, _ = volumetric_rendering(rgb, density, t, dirs, white_bkgd=False)
    torch.testing.assert_close(acc, torch.ones(3))
    torch.testing.assert_close(comp, rgb[:, 3])
    torch.testing.assert_close(dist, 0.5 * (t[:, 3] + t[:, 4]))


def test_outputs_and_gradients_finite_at_extreme_scales():
    gen = torch.Generator().manual_seed(8)
    d = torch.randn(6, 3, generator=gen).requires_grad_(True)
    t0 = torch.tensor([1e-4, 1.0, 1e4, 1e4, 2.0, 1e-3])[:, None].requires_grad_(True)
    width = torch.tensor([1e-7, 1e-6, 1e-3, 1e3, 1e4, 1e-3])[:, None]
    radius = torch.tensor([1e-8, 1e-3, 1.0, 1e3, 1e-6, 0.0])[:, None].requires_grad_(True)
    t1 = t0 + width
    for fn in (conical_frustum_to_gaussian, cylinder_to_gaussian):
        mean, cov = fn(d, t0, t1, radius, diag=True)
        enc = integrated_pos_enc(mean, cov, 0, 16)
        assert torch.isfinite(mean).all() and torch.isfinite(cov).all() and torch.isfinite(enc).all()
        grads = torch.autograd.grad(enc.sum() + mean.sum() + cov.sum(), (d, t0, radius))
        assert all(torch.isfinite(g).all() for g in grads)

    t = torch.linspace(2.0, 6.0, 9).expand(4, 9)
    density = torch.tensor([0.0, 1e-8, 1e3, 1e8])[:, None].expand(4, 8).clone().requires_grad_(True)
    rgb = torch.rand(4, 8, 3).requires_grad_(True)
    outs = volumetric_rendering(rgb, density, t, torch.randn(4, 3), white_bkgd=True)
    assert all(torch.isfinite(o).all() for o in outs)
    grads = torch.autograd.grad(sum(o.sum() for o in outs[:3]), (rgb, density))
    assert all(torch.isfinite(g).all() for g in grads)


def test_pinhole_rays_match_hand_computed_camera():
    f, w, h = 50.0, 8, 6
    pix2cam = ray_utils.pinhole_pix2cam(f, w, h, dtype=f64)
    c2w = torch.tensor([[0.0, 0.0, 1.0, 4.0], [1.0, 0.0, 0.0, -1.0], [0.0, 1.0, 0.0, 2.0]], dtype=f64)
    x, y = torch.tensor([0, 7, 3]), torch.tensor([0, 5, 2])
    o, dirs, viewdirs, radii = ray_utils.pixel_rays(pix2cam, c2w, x, y)
    for k in range(3):
        cam = torch.tensor([(x[k] + 0.5 - w / 2) / f, -(y[k] + 0.5 - h / 2) / f, -1.0], dtype=f64)
        torch.testing.assert_close(dirs[k], c2w[:, :3] @ cam)
        torch.testing.assert_close(o[k], c2w[:, 3])
    torch.testing.assert_close(viewdirs.norm(dim=-1), torch.ones(3, dtype=f64))
    torch.testing.assert_close(radii, torch.full((3, 1), 2 / math.sqrt(12) / f, dtype=f64))
