"""Truth tests of mip-NeRF 360's coordinates in ray_utils, in the spirit of multinerf's coord_test.py.

contract against its closed form (Eq. 10), its Jacobian against autograd, the linearized
Gaussians against Monte-Carlo samples pushed through contract, the ray warps (Eq. 11) against
their closed forms, the basis against the geodesic polyhedron it tessellates, and the lifted
Gaussians and their encoding against brute force and Monte-Carlo.
"""

import functools
import math

import pytest
import torch

from ray_utils import (
    cast_rays,
    construct_ray_warps,
    contract,
    contract_jacobian,
    generate_basis,
    integrated_pos_enc,
    integrated_pos_enc_basis,
    lift_and_diagonalize,
    pos_enc,
    track_linearize,
)

f64 = torch.float64


def _directions(gen, n, dtype=f64):
    d = torch.randn(n, 3, generator=gen, dtype=dtype)
    return d / d.norm(dim=-1, keepdim=True)


def _random_cov(gen, shape, scale=1.0, dtype=f64):
    half = torch.randn(shape + (3, 3), generator=gen, dtype=dtype)
    return scale**2 * (half @ half.transpose(-1, -2) + 0.1 * torch.eye(3, dtype=dtype))


# ----------------------------------------------------------------------------
# contract (Eq. 10) and its Jacobian.


def test_contract_matches_its_closed_form():
    gen = torch.Generator().manual_seed(0)
    r = torch.logspace(-3, 8, 2000, dtype=f64)
    u = _directions(gen, 2000)
    x = r[:, None] * u
    z = contract(x)
    inside = r <= 1
    torch.testing.assert_close(z[inside], x[inside], rtol=0, atol=0)  # The identity in the unit ball.
    zn = z.norm(dim=-1)
    torch.testing.assert_close(zn[~inside], 2 - 1 / r[~inside], rtol=1e-14, atol=0)  # ||z|| = 2 - 1/r outside.
    torch.testing.assert_close(z / zn[:, None], u)  # Radial: the direction is kept.
    assert torch.all(zn < 2)
    # Radially monotone along each ray, and continuous across the unit sphere.
    radii = torch.logspace(-4, 6, 500, dtype=f64)
    along = contract(radii[:, None, None] * u[None, :10]).norm(dim=-1)
    assert torch.all(along[1:] > along[:-1])
    torch.testing.assert_close(contract(u * (1 + 1e-9)), u, rtol=0, atol=1e-8)
    # float32 with huge and tiny magnitudes (multinerf's test): bounded by 2.
    sign = torch.where(torch.rand(10000, 3, generator=gen) < 0.5, -1.0, 1.0)
    x32 = sign * torch.exp(20 * torch.rand(10000, 3, generator=gen) - 10)
    z32 = contract(x32)
    assert torch.isfinite(z32).all() and z32.norm(dim=-1).max() <= 2


def test_contract_spaces_inverse_distance_evenly():
    """Fig. 2 of the paper: from the unit sphere to infinity, evenly spaced disparity maps to evenly spaced
    contracted distance."""
    n = 10
    _, s_to_t = construct_ray_warps(torch.reciprocal, torch.tensor(1.0, dtype=f64), torch.tensor(math.inf, dtype=f64))
    s = torch.linspace(0, 1 - torch.finfo(torch.float32).eps, n + 1, dtype=f64)
    tc = contract(s_to_t(s)[:, None])[:, 0]
    torch.testing.assert_close(tc.diff(), torch.full((n,), 1 / n, dtype=f64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float32, f64])
def test_contract_jacobian_matches_autograd(dtype):
    gen = torch.Generator().manual_seed(1)
    radii = [0.0, 1e-6, 0.3, 1 - 1e-6, 1.0, 1 + 1e-6, 1.01, 1.5, 3.0, 47.0, 1e3, 1e5, 1e8]
    u = _directions(gen, len(radii) * 4, dtype)
    x = torch.tensor(radii, dtype=dtype).repeat(4)[:, None] * u
    jac = contract_jacobian(x)
    # contract is pointwise, so the Jacobian of the sum over points is every point's Jacobian.
    ref = torch.autograd.functional.jacobian(lambda p: contract(p).sum(0), x, vectorize=True).permute(1, 0, 2)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(jac, ref, **tol)
    # Its eigen-structure: 1/r^2 along x, (2 - 1/r)/r across, for r > 1; symmetric.
    r = x.norm(dim=-1)
    out = r > 1
    radial = (u[:, None, :] @ jac @ u[:, :, None])[:, 0, 0]
    torch.testing.assert_close(radial[out], 1 / r[out] ** 2, **tol)
    e1 = torch.linalg.cross(u, torch.tensor([0.6, 0.0, 0.8], dtype=dtype).expand_as(u))
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    tangential = (e1[:, None, :] @ jac @ e1[:, :, None])[:, 0, 0]
    torch.testing.assert_close(tangential[out], ((2 - 1 / r) / r)[out], **tol)
    torch.testing.assert_close(jac, jac.transpose(-1, -2))
    # Finite gradients everywhere, the origin included (multinerf's test).
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-4, 4, 11, dtype=dtype)] * 3, indexing='ij'), -1)
    grid.requires_grad_(True)
    (g,) = torch.autograd.grad(contract(grid).sum(), grid)
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------
# Linearized Gaussians (Sec. 2: f(mean, cov) = (f(mean), J cov J^T)).


def test_track_linearize_is_exact_for_affine_maps():
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        d_in, d_out = (int(v) for v in torch.randint(1, 7, (2,), generator=gen))
        mean = torch.randn(20, d_in, generator=gen, dtype=f64)
        half = torch.randn(20, d_in, d_in, generator=gen, dtype=f64)
        cov = half @ half.transpose(-1, -2)
        a = torch.randn(d_out, d_in, generator=gen, dtype=f64)
        b = torch.randn(d_out, generator=gen, dtype=f64)

        def affine(x, a=a, b=b):
            return x @ a.T + b

        fn_mean, fn_cov = track_linearize(affine, mean, cov)
        torch.testing.assert_close(fn_mean, mean @ a.T + b)
        torch.testing.assert_close(fn_cov, a @ cov @ a.T)
    with pytest.raises(ValueError):
        track_linearize(contract, mean[:, :3], mean[:, :3])  # A diagonal covariance.


def _moments_agree(y, mean, cov, k=6.0):
    """Do Monte-Carlo samples y `[N, 3]` have this mean and covariance, within k standard errors?"""
    n = y.shape[0]
    mc_mean, mc_cov = y.mean(0), torch.cov(y.T)
    var = torch.diagonal(mc_cov)
    se_mean = torch.sqrt(var / n)
    se_cov = torch.sqrt((var[:, None] * var[None, :] + mc_cov**2) / n)
    return bool(torch.all((mean - mc_mean).abs() <= k * se_mean) and torch.all((cov - mc_cov).abs() <= k * se_cov))


@pytest.mark.parametrize('radius', [0.5, 0.99, 1.5, 4.0, 30.0, 1000.0])
def test_linearized_covariance_matches_monte_carlo_through_contract(radius):
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    mean = radius * _directions(gen, 1)[0]
    # Small Gaussians (std ~ 0.1% of the distance, 0.5% near the unit sphere), so that the
    # linearization's error is far below the Monte-Carlo noise; anisotropic and correlated.
    scale = 0.005 if radius < 1 else 1e-3 * radius
    cov = _random_cov(gen, (), scale)
    x = mean + torch.randn(n, 3, generator=gen, dtype=f64) @ torch.linalg.cholesky(cov).T
    y = contract(x)
    fn_mean, fn_cov = track_linearize(contract, mean, cov)
    assert _moments_agree(y, fn_mean, fn_cov)
    if radius > 1.1:  # The test can fail: it rejects an unwarped covariance, and a Jacobian without its radial term.
        assert not _moments_agree(y, fn_mean, cov)
        r = mean.norm()
        wrong_jac = (2 - 1 / r) / r * torch.eye(3, dtype=f64)
        assert not _moments_agree(y, fn_mean, wrong_jac @ cov @ wrong_jac.T)


def test_track_linearize_of_frustums_keeps_gradients_and_generic_path_agrees():
    gen = torch.Generator().manual_seed(4)
    origins = torch.randn(2, 3, generator=gen, dtype=f64)
    dirs = torch.randn(2, 3, generator=gen, dtype=f64)
    radii = torch.full((2, 1), 0.01, dtype=f64)
    t = torch.tensor([0.5, 1.0, 3.0, 30.0, 1e3, 1e6], dtype=f64).expand(2, -1)
    mean, cov = cast_rays(t, origins, dirs, radii, 'cone', diag=False)  # Full covariances, [2, 5, 3, 3].
    fn_mean, fn_cov = track_linearize(contract, mean, cov)
    assert fn_mean.shape == (2, 5, 3) and fn_cov.shape == (2, 5, 3, 3)
    assert torch.isfinite(fn_cov).all() and fn_mean.norm(dim=-1).max() < 2
    assert torch.linalg.eigvalsh(fn_cov).min() > -1e-12  # Still covariances.
    # The generic path (torch.func.jacrev) agrees with the analytic Jacobian.
    g_mean, g_cov = track_linearize(lambda p: contract(p), mean, cov)
    torch.testing.assert_close(g_mean, fn_mean)
    torch.testing.assert_close(g_cov, fn_cov)
    # Gradients flow to the means and covariances on both paths.
    m = (3 * torch.randn(4, 3, generator=gen, dtype=f64)).requires_grad_(True)
    c = _random_cov(gen, (4,), 0.1).requires_grad_(True)
    for fn in (contract, lambda p: contract(p)):
        assert torch.autograd.gradcheck(functools.partial(track_linearize, fn), (m, c))


# ----------------------------------------------------------------------------
# Ray warps (Eq. 11).


@pytest.mark.parametrize('fn', [torch.reciprocal, torch.log, torch.sqrt, 'reciprocal', 'square', None, 'piecewise'])
def test_construct_ray_warps_extents_and_round_trip(fn):
    gen = torch.Generator().manual_seed(5)
    n = 100
    t_near = torch.exp(torch.randn(n, 1, generator=gen, dtype=f64))
    if fn == 'piecewise':
        t_near[: n // 2] = 0.0  # It allows t_near = 0.
    t_far = t_near + torch.exp(torch.randn(n, 1, generator=gen, dtype=f64))
    t_to_s, s_to_t = construct_ray_warps(fn, t_near, t_far)
    zeros, ones = torch.zeros_like(t_near), torch.ones_like(t_near)
    torch.testing.assert_close(t_to_s(t_near), zeros, rtol=0, atol=1e-12)
    torch.testing.assert_close(t_to_s(t_far), ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_to_t(zeros), t_near)
    torch.testing.assert_close(s_to_t(ones), t_far)
    u = torch.rand(n, 50, generator=gen, dtype=f64).sort(-1).values
    t = t_near + u * (t_far - t_near)
    s = t_to_s(t)
    assert torch.all(s[:, 1:] > s[:, :-1]) and torch.all(s >= -1e-12) and torch.all(s <= 1 + 1e-12)
    torch.testing.assert_close(s_to_t(s), t)
    torch.testing.assert_close(t_to_s(s_to_t(u)), u)
    # Finite gradients, also at t = 0 and t = 1 for 'piecewise'.
    t.requires_grad_(True)
    (g,) = torch.autograd.grad(t_to_s(t).sum(), t)
    assert torch.isfinite(g).all()
    if fn == 'piecewise':
        t_to_s, s_to_t = construct_ray_warps(fn, torch.tensor(0.0, dtype=f64), torch.tensor(1e6, dtype=f64))
        t = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e6], dtype=f64, requires_grad=True)
        s = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9], dtype=f64, requires_grad=True)
        grads = torch.autograd.grad(t_to_s(t).sum() + s_to_t(s).sum(), (t, s))
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_reciprocal_ray_warp_closed_form_and_disparity_spacing():
    gen = torch.Generator().manual_seed(6)
    n = 100
    t_near = torch.exp(torch.randn(n, generator=gen, dtype=f64))
    t_far = t_near + torch.exp(torch.randn(n, generator=gen, dtype=f64))
    u = torch.rand(n, generator=gen, dtype=f64)
    t = t_near * (1 - u) + t_far * u
    s = torch.rand(n, generator=gen, dtype=f64)
    t_to_s, s_to_t = construct_ray_warps(torch.reciprocal, t_near, t_far)
    torch.testing.assert_close(t_to_s(t), t_far * (t - t_near) / (t * (t_far - t_near)))
    torch.testing.assert_close(s_to_t(s), 1 / (s / t_far + (1 - s) / t_near))
    # Uniform in s is uniform in disparity 1/t.
    _, s_to_t = construct_ray_warps(torch.reciprocal, t_near[:, None], t_far[:, None])
    disparity = 1 / s_to_t(torch.linspace(0, 1, 9, dtype=f64))
    step = (1 / t_far - 1 / t_near)[:, None] / 8
    torch.testing.assert_close(disparity.diff(dim=-1), step.expand(-1, 8))
    # t_far = inf: s = 1 - t_near / t.
    t_to_s, s_to_t = construct_ray_warps(torch.reciprocal, torch.tensor(2.0), torch.tensor(math.inf))
    torch.testing.assert_close(t_to_s(torch.tensor([2.0, 4.0, 8.0])), torch.tensor([0.0, 0.5, 0.75]))
    assert s_to_t(torch.tensor(1.0)) == math.inf
    for bad in (torch.sin, 'cube'):
        with pytest.raises(ValueError):
            construct_ray_warps(bad, t_near, t_far)


# ----------------------------------------------------------------------------
# The basis (geopoly) and the lifted Gaussians.

# multinerf's geopoly.generate_basis('icosahedron', 2), row k = direction k (computed from the release).
RELEASE_ICOSAHEDRON_2 = [
    (0.85065081, 0.00000000, 0.52573111),
    (0.80901699, 0.50000000, 0.30901699),
    (0.52573111, 0.85065081, 0.00000000),
    (1.00000000, 0.00000000, 0.00000000),
    (0.80901699, 0.50000000, -0.30901699),
    (0.85065081, 0.00000000, -0.52573111),
    (0.30901699, 0.80901699, -0.50000000),
    (0.00000000, 0.52573111, -0.85065081),
    (0.50000000, 0.30901699, -0.80901699),
    (0.00000000, 1.00000000, 0.00000000),
    (-0.52573111, 0.85065081, 0.00000000),
    (-0.30901699, 0.80901699, -0.50000000),
    (0.00000000, 0.52573111, 0.85065081),
    (-0.30901699, 0.80901699, 0.50000000),
    (0.30901699, 0.80901699, 0.50000000),
    (0.50000000, 0.30901699, 0.80901699),
    (0.50000000, -0.30901699, 0.80901699),
    (0.00000000, 0.00000000, 1.00000000),
    (-0.50000000, 0.30901699, 0.80901699),
    (-0.80901699, 0.50000000, 0.30901699),
    (-0.80901699, 0.50000000, -0.30901699),
]


def _icosahedron_and_edge_midpoints():
    """The 12 vertices (cyclic permutations of (0, +-1, +-phi)) and the 30 edge midpoints, on the unit sphere."""
    phi = (1 + math.sqrt(5)) / 2
    base = [(0.0, a, b * phi) for a in (-1, 1) for b in (-1, 1)]
    verts = torch.tensor([p[k:] + p[:k] for p in base for k in range(3)], dtype=f64)
    dist = (verts[:, None, :] - verts[None, :, :]).norm(dim=-1)
    i, j = torch.nonzero((dist - 2).abs() < 1e-9, as_tuple=True)  # Edges have length 2.
    mids = (verts[i] + verts[j])[i < j]
    pts = torch.cat([verts, mids])
    return pts / pts.norm(dim=-1, keepdim=True)


def test_icosahedron_basis_is_the_geodesic_polyhedron_without_antipodes(device):
    basis = generate_basis('icosahedron', 2, dtype=f64, device=device)
    assert basis.shape == (3, 21) and basis.dtype == f64 and basis.device.type == device.type
    basis = basis.cpu()
    torch.testing.assert_close(basis.norm(dim=0), torch.ones(21, dtype=f64))
    # No two directions equal or opposite.
    dots = (basis.T @ basis)[~torch.eye(21, dtype=torch.bool)]
    assert dots.abs().max() < 1 - 1e-3
    # With their antipodes: exactly the 12 vertices and 30 edge midpoints of the icosahedron.
    both = torch.cat([basis.T, -basis.T])
    ref = _icosahedron_and_edge_midpoints()
    assert ref.shape == (42, 3)
    match = (both[:, None, :] - ref[None, :, :]).norm(dim=-1) < 1e-9
    assert torch.all(match.sum(0) == 1) and torch.all(match.sum(1) == 1)
    # In the release's order (which fixes the order of the encoding's features).
    torch.testing.assert_close(basis.T, torch.tensor(RELEASE_ICOSAHEDRON_2, dtype=f64), rtol=0, atol=1e-8)
    assert generate_basis().dtype == torch.float32


def test_other_bases_and_bad_arguments():
    b1 = generate_basis('icosahedron', 1, dtype=f64)  # The 6 axes of the icosahedron.
    assert b1.shape == (3, 6)
    off = (b1.T @ b1).abs()[~torch.eye(6, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, 1 / math.sqrt(5)))
    for shape, v, count in [('icosahedron', 3, 46), ('octahedron', 2, 9), ('octahedron', 4, 33)]:
        assert generate_basis(shape, v).shape == (3, count)  # (10 v^2 + 2) / 2 and (4 v^2 + 2) / 2.
    # The octahedron once: the three axes (negated and reversed, as the release's).
    torch.testing.assert_close(generate_basis('octahedron', 1, dtype=f64), -torch.eye(3, dtype=f64).flip(-1))
    with pytest.raises(ValueError):
        generate_basis('cube', 2)
    with pytest.raises(ValueError):
        generate_basis('icosahedron', 0)


def test_lift_and_diagonalize_matches_brute_force_and_monte_carlo():
    gen = torch.Generator().manual_seed(7)
    basis = generate_basis(dtype=f64)
    mean = torch.randn(5, 7, 3, generator=gen, dtype=f64)
    cov = _random_cov(gen, (5, 7), 0.5)
    lm, lv = lift_and_diagonalize(mean, cov, basis)
    assert lm.shape == (5, 7, 21) and lv.shape == (5, 7, 21)
    for k in range(21):
        b = basis[:, k]
        torch.testing.assert_close(lm[..., k], (mean * b).sum(-1))
        torch.testing.assert_close(lv[..., k], torch.einsum('i,...ij,j->...', b, cov, b))
    # A diagonal covariance, given as its diagonal, is the full one.
    diag = torch.rand(5, 7, 3, generator=gen, dtype=f64)
    torch.testing.assert_close(
        lift_and_diagonalize(mean, diag, basis), lift_and_diagonalize(mean, torch.diag_embed(diag), basis)
    )
    # The projections of samples have these means and variances.
    n = 200_000
    x = mean[0, 0] + torch.randn(n, 3, generator=gen, dtype=f64) @ torch.linalg.cholesky(cov[0, 0]).T
    proj = x @ basis
    var = proj.var(0)
    assert torch.all((proj.mean(0) - lm[0, 0]).abs() < 5 * torch.sqrt(var / n))
    assert torch.all((var - lv[0, 0]).abs() < 6 * var * math.sqrt(2 / n))


def test_integrated_pos_enc_basis_matches_monte_carlo_and_release_layout():
    gen = torch.Generator().manual_seed(8)
    basis = generate_basis(dtype=f64)
    mean = torch.randn(3, 3, generator=gen, dtype=f64)
    cov = _random_cov(gen, (3,), 0.1)
    enc = integrated_pos_enc_basis(mean, cov, basis, 0, 5)
    assert enc.shape == (3, 2 * 21 * 5)
    lm, lv = lift_and_diagonalize(mean, cov, basis)
    torch.testing.assert_close(enc, integrated_pos_enc(lm, lv, 0, 5))
    # E[sin(2^l b.x)] and E[cos(2^l b.x)], by Monte-Carlo.
    n = 100_000
    z = torch.randn(n, 3, 3, generator=gen, dtype=f64)
    x = mean + torch.einsum('bij,nbj->nbi', torch.linalg.cholesky(cov), z)
    mc = pos_enc(x @ basis, 0, 5, append_identity=False).mean(0)
    assert (enc - mc).abs().max() < 5 / math.sqrt(n)
    # The release's layout: sin(x) then sin(x + pi/2), each ordered (degree, direction).
    scaled_mean = (lm[..., None, :] * 2.0 ** torch.arange(5, dtype=f64)[:, None]).reshape(3, -1)
    scaled_var = (lv[..., None, :] * 4.0 ** torch.arange(5, dtype=f64)[:, None]).reshape(3, -1)
    release = torch.exp(-0.5 * torch.cat([scaled_var] * 2, -1)) * torch.sin(
        torch.cat([scaled_mean, scaled_mean + 0.5 * math.pi], -1)
    )
    torch.testing.assert_close(enc, release)
