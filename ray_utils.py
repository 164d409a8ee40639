"""Rays, conical frustums, integrated positional encoding and volume rendering.

Pure tensor functions: every function takes any leading batch shape `...`,
works on any device and floating dtype, and keeps no state.

Vocabulary (as in the mip-NeRF paper, Barron et al. 2021, and the official
JAX release google/mipnerf):
  o, d    ray origins and (unnormalized) directions, `[..., 3]`.
  r       base radius of the cone: the radius of the pixel's footprint at
          distance t = 1 along d, `[..., 1]` (Sec. 3.1 of the paper).
  t       interval endpoints ("t_vals") along a ray, sorted, `[..., S+1]`;
          interval i is [t[i], t[i+1]] and is a conical frustum.
  w       rendering weights of the S intervals, `[..., S]`.
  mean    Gaussian means of the intervals in world space, `[..., S, 3]`.
  cov     Gaussian covariances, diagonal `[..., S, 3]` or full
          `[..., S, 3, 3]`.
"""

import math
from collections import namedtuple

import torch

import stepfun

Rays = namedtuple('Rays', ('origins', 'directions', 'viewdirs', 'radii', 'lossmult', 'near', 'far'))
Rays.__doc__ = """A bundle of rays; every field has the same leading shape `[...]`.

origins, directions, viewdirs: `[..., 3]`; radii, lossmult, near, far: `[..., 1]`.
"""


def namedtuple_map(fn, tup):
    """Apply `fn` to every field of a namedtuple, returning the same type."""
    return type(tup)(*(fn(x) for x in tup))


# ----------------------------------------------------------------------------
# Cameras.


def pixel_rays(pix2cam, cam2world, x, y):
    """Rays through pixel positions of pinhole cameras (pixel centres at +0.5).

    The camera maps the homogeneous pixel position p = (x + 0.5, y + 0.5, 1) to
    a camera-space direction `pix2cam @ p` (OpenGL convention: the camera
    looks down -z, y is up) and rotates it into the world with `cam2world`.
    The base radius is, as in the official release, the distance between the
    directions of vertically neighbouring pixels times 2/sqrt(12): halfway
    between the circles inscribed in and circumscribed about the pixel.

    Args:
      pix2cam: `[..., 3, 3]` pixel-to-camera matrices.
      cam2world: `[..., 3, 4]` camera-to-world matrices [R | t].
      x, y: `[...]` pixel column and row indices (integers or floats).

    Returns:
      origins `[..., 3]`, directions `[..., 3]`, viewdirs `[..., 3]`,
      radii `[..., 1]`.
    """
    dtype = cam2world.dtype
    p = torch.stack([x.to(dtype) + 0.5, y.to(dtype) + 0.5, torch.ones_like(x, dtype=dtype)], -1)
    rot = cam2world[..., :3, :3]
    cam_dirs = (pix2cam @ p[..., None])[..., 0]
    directions = (rot @ cam_dirs[..., None])[..., 0]
    origins = torch.broadcast_to(cam2world[..., :3, 3], directions.shape)
    viewdirs = directions / torch.linalg.norm(directions, dim=-1, keepdim=True)
    # Directions are linear in the pixel position, so the difference between
    # neighbouring rows is R @ pix2cam @ (0, 1, 0) for every pixel.
    step = (rot @ pix2cam[..., :, 1:2])[..., 0]
    radii = torch.linalg.norm(step, dim=-1, keepdim=True) * (2 / math.sqrt(12))
    radii = torch.broadcast_to(radii, directions.shape[:-1] + (1,))
    return origins, directions, viewdirs, radii


def pinhole_pix2cam(focal, width, height, dtype=torch.float32, device=None):
    """The `[3, 3]` pix2cam matrix of a centred pinhole camera (Blender/LLFF).

    Pixel (x + 0.5, y + 0.5) maps to ((x + 0.5 - W/2) / f, -(y + 0.5 - H/2) / f, -1).
    """
    f = float(focal)
    return torch.tensor(
        [[1 / f, 0, -0.5 * width / f], [0, -1 / f, 0.5 * height / f], [0, 0, -1]], dtype=dtype, device=device
    )


def convert_to_ndc(origins, directions, focal, width, height, near=1.0):
    """Warp world-space rays of a forward-facing camera into NDC (NeRF App. C).

    Origins are first moved along their rays to the plane z = -near; the
    frustum z in [-near, -inf) maps to [-1, 1), so NDC origins lie on z = -1
    and o + d on z = 1.

    Args:
      origins, directions: `[..., 3]` in the re-centred world, where the
        cameras look down -z.
      focal, width, height: the pinhole camera the rays came from.

    Returns:
      ndc origins `[..., 3]`, ndc directions `[..., 3]`.
    """
    t = -(near + origins[..., 2]) / directions[..., 2]
    origins = origins + t[..., None] * directions
    ox, oy, oz = origins.unbind(-1)
    dx, dy, dz = directions.unbind(-1)
    fx, fy = 2 * focal / width, 2 * focal / height
    o = torch.stack([-fx * ox / oz, -fy * oy / oz, 1 + 2 * near / oz], -1)
    d = torch.stack([-fx * (dx / dz - ox / oz), -fy * (dy / dz - oy / oz), -2 * near / oz], -1)
    return o, d


# ----------------------------------------------------------------------------
# Gaussians of conical frustums and cylinders (Sec. 3.1, Eq. 7 and App. A).


def lift_gaussian(d, t_mean, t_var, r_var, diag):
    """Lift a Gaussian along the ray axis `d` to a 3D Gaussian.

    Args:
      d: `[..., 3]` ray directions (not necessarily unit length).
      t_mean, t_var, r_var: `[..., S]` mean and variance along the ray and
        variance perpendicular to it.
      diag: return the diagonal of the covariance only.

    Returns:
      mean `[..., S, 3]`, cov `[..., S, 3]` (diag) or `[..., S, 3, 3]`.
    """
    mean = d[..., None, :] * t_mean[..., None]
    d_mag_sq = torch.clamp_min(torch.sum(d**2, dim=-1, keepdim=True), 1e-10)
    if diag:
        d_outer_diag = d**2
        null_outer_diag = 1 - d_outer_diag / d_mag_sq
        cov = t_var[..., None] * d_outer_diag[..., None, :] + r_var[..., None] * null_outer_diag[..., None, :]
        return mean, cov
    d_outer = d[..., :, None] * d[..., None, :]
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    null_outer = eye - d[..., :, None] * (d / d_mag_sq)[..., None, :]
    cov = t_var[..., None, None] * d_outer[..., None, :, :] + r_var[..., None, None] * null_outer[..., None, :, :]
    return mean, cov


def conical_frustum_to_gaussian(d, t0, t1, base_radius, diag, stable=True):
    """Mean and covariance of the conical frustum between t0 and t1 (Eq. 7).

    The cone starts at the origin with axis `d` and has radius `base_radius`
    at t = 1. The moments are exact for a uniform density in the frustum.
    `stable=True` uses the reparameterization by the interval's centre and
    half-width (t_mu, t_delta) of the paper's Eq. 7, which avoids the
    catastrophic cancellation of the direct form when t1 - t0 << t0.

    Args:
      d: `[..., 3]`; t0, t1: `[..., S]`; base_radius: `[..., 1]` (or broadcastable).

    Returns:
      mean `[..., S, 3]`, cov `[..., S, 3]` or `[..., S, 3, 3]`.
    """
    if stable:
        mu = (t0 + t1) / 2
        hw = (t1 - t0) / 2
        denom = 3 * mu**2 + hw**2
        t_mean = mu + (2 * mu * hw**2) / denom
        t_var = hw**2 / 3 - (4 / 15) * (hw**4 * (12 * mu**2 - hw**2)) / denom**2
        r_var = base_radius**2 * (mu**2 / 4 + (5 / 12) * hw**2 - (4 / 15) * hw**4 / denom)
    else:
        t_mean = (3 * (t1**4 - t0**4)) / (4 * (t1**3 - t0**3))
        r_var = base_radius**2 * (3 / 20 * (t1**5 - t0**5) / (t1**3 - t0**3))
        t_mosq = 3 / 5 * (t1**5 - t0**5) / (t1**3 - t0**3)
        t_var = t_mosq - t_mean**2
    return lift_gaussian(d, t_mean, t_var, r_var, diag)


def cylinder_to_gaussian(d, t0, t1, radius, diag):
    """Mean and covariance of the cylinder of `radius` around `d` from t0 to t1.

    Args:
      d: `[..., 3]`; t0, t1: `[..., S]`; radius: `[..., 1]` (or broadcastable).

    Returns:
      mean `[..., S, 3]`, cov `[..., S, 3]` or `[..., S, 3, 3]`.
    """
    t_mean = (t0 + t1) / 2
    r_var = radius**2 / 4
    t_var = (t1 - t0) ** 2 / 12
    return lift_gaussian(d, t_mean, t_var, r_var, diag)


def cast_rays(t_vals, origins, directions, radii, ray_shape, diag=True):
    """Gaussians of the S sections of cone- or cylinder-shaped rays.

    Args:
      t_vals: `[..., S+1]` interval endpoints.
      origins, directions: `[..., 3]`; radii: `[..., 1]`.
      ray_shape: 'cone' or 'cylinder'.
      diag: diagonal covariances `[..., S, 3]` instead of `[..., S, 3, 3]`.

    Returns:
      mean `[..., S, 3]`, cov.
    """
    t0, t1 = t_vals[..., :-1], t_vals[..., 1:]
    if ray_shape == 'cone':
        mean, cov = conical_frustum_to_gaussian(directions, t0, t1, radii, diag)
    elif ray_shape == 'cylinder':
        mean, cov = cylinder_to_gaussian(directions, t0, t1, radii, diag)
    else:
        raise ValueError(f"ray_shape must be 'cone' or 'cylinder', got {ray_shape!r}")
    return mean + origins[..., None, :], cov


# ----------------------------------------------------------------------------
# Positional encodings (Sec. 3.1, Eq. 14).


def _scales(min_deg, max_deg, like):
    return 2.0 ** torch.arange(min_deg, max_deg, dtype=like.dtype, device=like.device)


def pos_enc(x, min_deg, max_deg, append_identity=True):
    """NeRF's positional encoding gamma(x).

    Args:
      x: `[..., C]`.

    Returns:
      `[..., C + 2*C*(max_deg-min_deg)]` with identity, or without:
      [x, sin(2^l x) for l, c in order, cos(2^l x) likewise].
    """
    scales = _scales(min_deg, max_deg, x)
    xb = (x[..., None, :] * scales[:, None]).reshape(x.shape[:-1] + (-1,))
    feat = torch.cat([torch.sin(xb), torch.cos(xb)], dim=-1)
    return torch.cat([x, feat], dim=-1) if append_identity else feat


def integrated_pos_enc(mean, cov_diag, min_deg, max_deg):
    """Integrated positional encoding: E[gamma(x)] for x ~ N(mean, diag(cov_diag)).

    E[sin(a x)] = sin(a mu) exp(-a^2 var / 2), likewise for cos (Eq. 14).

    Args:
      mean, cov_diag: `[..., 3]`.

    Returns:
      `[..., 2*3*(max_deg-min_deg)]`: the sin block then the cos block, each
      ordered (degree, coordinate), as the official release.
    """
    scales = _scales(min_deg, max_deg, mean)
    shape = mean.shape[:-1] + (-1,)
    y = (mean[..., None, :] * scales[:, None]).reshape(shape)
    y_var = (cov_diag[..., None, :] * scales[:, None] ** 2).reshape(shape)
    damp = torch.exp(-0.5 * y_var)
    return torch.cat([damp * torch.sin(y), damp * torch.cos(y)], dim=-1)


# ----------------------------------------------------------------------------
# Sampling along rays.


def sample_along_rays(
    origins, directions, radii, num_samples, near, far, randomized, lindisp, ray_shape, generator=None
):
    """Stratified sampling of S = num_samples intervals between near and far.

    Args:
      origins, directions: `[..., 3]`; radii, near, far: `[..., 1]`.
      randomized: jitter each endpoint uniformly inside its stratum
        (training); otherwise evenly spaced endpoints (evaluation).
      lindisp: space the endpoints linearly in disparity instead of depth.

    Returns:
      t_vals `[..., S+1]`, (mean `[..., S, 3]`, cov_diag `[..., S, 3]`).
    """
    u = torch.linspace(0.0, 1.0, num_samples + 1, dtype=origins.dtype, device=origins.device)
    if lindisp:
        t_vals = 1.0 / (1.0 / near * (1.0 - u) + 1.0 / far * u)
    else:
        t_vals = near * (1.0 - u) + far * u
    t_vals = torch.broadcast_to(t_vals, origins.shape[:-1] + (num_samples + 1,))
    if randomized:
        mids = 0.5 * (t_vals[..., 1:] + t_vals[..., :-1])
        upper = torch.cat([mids, t_vals[..., -1:]], -1)
        lower = torch.cat([t_vals[..., :1], mids], -1)
        t_rand = torch.rand(t_vals.shape, dtype=t_vals.dtype, device=t_vals.device, generator=generator)
        t_vals = lower + (upper - lower) * t_rand
    return t_vals, cast_rays(t_vals, origins, directions, radii, ray_shape)


def sorted_piecewise_constant_pdf(bins, weights, num_samples, randomized, generator=None):
    """Inverse-transform sampling of the piecewise-constant PDF on sorted bins.

    Args:
      bins: `[..., B+1]` sorted bin endpoints.
      weights: `[..., B]` non-negative weights (need not be normalized; all
        zero gives a uniform PDF).
      num_samples: number N of samples drawn.
      randomized: stratified random u (training) or evenly spaced u in
        [0, 1 - eps] (evaluation).

    Returns:
      `[..., N]` sorted samples in [bins[..., 0], bins[..., -1]].
    """
    eps = 1e-5
    weight_sum = torch.sum(weights, dim=-1, keepdim=True)
    padding = torch.clamp_min(eps - weight_sum, 0)
    weights = weights + padding / weights.shape[-1]
    weight_sum = weight_sum + padding
    cdf = stepfun.integrate_weights(weights / weight_sum)
    batch = cdf.shape[:-1]

    float_eps = torch.finfo(torch.float32).eps
    if randomized:
        s = 1 / num_samples
        u = torch.arange(num_samples, dtype=cdf.dtype, device=cdf.device) * s
        u = u + torch.rand(batch + (num_samples,), dtype=cdf.dtype, device=cdf.device, generator=generator) * (
            s - float_eps
        )
        u = torch.clamp_max(u, 1.0 - float_eps)
    else:
        u = torch.linspace(0.0, 1.0 - float_eps, num_samples, dtype=cdf.dtype, device=cdf.device)
        u = torch.broadcast_to(u, batch + (num_samples,)).contiguous()

    # The interval of u is [cdf[i], cdf[i+1]) with i the last index with
    # cdf[i] <= u; u < 1 = cdf[-1], so i + 1 <= B.
    idx = torch.searchsorted(cdf.contiguous(), u, right=True) - 1
    idx = idx.clamp(0, weights.shape[-1] - 1)
    bins_g0 = torch.gather(bins, -1, idx)
    bins_g1 = torch.gather(bins, -1, idx + 1)
    cdf_g0 = torch.gather(cdf, -1, idx)
    cdf_g1 = torch.gather(cdf, -1, idx + 1)
    t = torch.clamp(torch.nan_to_num((u - cdf_g0) / (cdf_g1 - cdf_g0), 0.0), 0, 1)
    return bins_g0 + t * (bins_g1 - bins_g0)


def resample_along_rays(
    origins, directions, radii, t_vals, weights, randomized, ray_shape, resample_padding, stop_grad=True, generator=None
):
    """Hierarchical resampling of the fine level from the coarse weights.

    The weights are blurred with a 2-tap max then a 2-tap average ("blurpool",
    Sec. 3.2 of the paper) and padded by `resample_padding` before sampling
    the piecewise-constant PDF. With `stop_grad` (the default, as the
    official release) no gradient flows through the new endpoints.

    Args:
      origins, directions: `[..., 3]`; radii: `[..., 1]`.
      t_vals: `[..., S+1]` coarse endpoints; weights: `[..., S]` coarse weights.

    Returns:
      new t_vals `[..., S+1]`, (mean `[..., S, 3]`, cov_diag `[..., S, 3]`).
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not stop_grad):
        weights_pad = torch.cat([weights[..., :1], weights, weights[..., -1:]], dim=-1)
        weights_max = torch.maximum(weights_pad[..., :-1], weights_pad[..., 1:])
        weights_blur = 0.5 * (weights_max[..., :-1] + weights_max[..., 1:])
        new_t_vals = sorted_piecewise_constant_pdf(
            t_vals, weights_blur + resample_padding, t_vals.shape[-1], randomized, generator
        )
    return new_t_vals, cast_rays(new_t_vals, origins, directions, radii, ray_shape)


# ----------------------------------------------------------------------------
# Volume rendering (Eq. 3 of NeRF, Mildenhall et al. 2020).


def compute_alpha_weights(density, t, dirs, opaque_background=False):
    """Compositing weights `[..., S]` of densities `[..., S]` on intervals `t [..., S+1]` along `dirs [..., 3]`.

    w_i = (1 - exp(-sigma_i delta_i)) exp(-sum_{j<i} sigma_j delta_j), delta_i the interval's length
    times |dirs|. With `opaque_background` the last interval is infinitely dense (mip-NeRF 360, as
    multinerf's `compute_alpha_weights`): every ray ends there, whatever lies beyond `far`.
    """
    delta = (t[..., 1:] - t[..., :-1]) * torch.linalg.norm(dirs[..., None, :], dim=-1)
    density_delta = density * delta
    if opaque_background:
        density_delta = torch.cat([density_delta[..., :-1], torch.full_like(density_delta[..., -1:], torch.inf)], -1)
    alpha = 1 - torch.exp(-density_delta)
    trans = torch.exp(-torch.cat([torch.zeros_like(density_delta[..., :1]), density_delta[..., :-1].cumsum(-1)], -1))
    return alpha * trans


def volumetric_rendering(rgb, density, t_vals, dirs, white_bkgd):
    """Alpha-composite S intervals along each ray.

    Args:
      rgb: `[..., S, 3]` colours; density: `[..., S]` non-negative densities.
      t_vals: `[..., S+1]` interval endpoints; dirs: `[..., 3]` ray
        directions (their norm converts t to distance).
      white_bkgd: composite onto white instead of black.

    Returns:
      comp_rgb `[..., 3]`, distance `[...]` (expected t, clipped to
      [t_vals[..., 0], t_vals[..., -1]]; the near end where the opacity is
      exactly 0, as the official release, whose nan_to_num maps 0/0 to 0),
      acc `[...]` opacity, weights `[..., S]`.
    """
    t_mids = 0.5 * (t_vals[..., :-1] + t_vals[..., 1:])
    weights = compute_alpha_weights(density, t_vals, dirs)
    comp_rgb = (weights[..., None] * rgb).sum(dim=-2)
    acc = weights.sum(dim=-1)
    t_near, t_far = t_vals[..., 0], t_vals[..., -1]
    tiny = torch.finfo(acc.dtype).tiny
    distance = (weights * t_mids).sum(dim=-1) / acc.clamp_min(tiny)
    distance = torch.where(acc > 0, distance, t_near)
    distance = torch.minimum(torch.maximum(distance, t_near), t_far)
    if white_bkgd:
        comp_rgb = comp_rgb + (1.0 - acc[..., None])
    return comp_rgb, distance, acc, weights


# ----------------------------------------------------------------------------
# mip-NeRF 360: contraction and ray warps (Barron et al., CVPR 2022, Sec. 2; the official release
# google-research/multinerf, internal/coord.py and internal/geopoly.py). Gaussians here are full:
# mean `[..., 3]`, cov `[..., 3, 3]` (`cast_rays(..., diag=False)` gives them for frustums).


def contract(x):
    """Contract unbounded space into the ball of radius 2 (Eq. 10).

    contract(x) = x where ||x|| <= 1, else (2 - 1/||x||) x / ||x||: continuous with a continuous
    Jacobian at ||x|| = 1, radially monotone, and ||contract(x)|| < 2 (2 after rounding for huge
    x; as in the release, ||x||^2 overflows past about 1e19 in float32).

    Args:
      x: `[..., C]` points (C = 3 for scenes).

    Returns:
      `[..., C]`.
    """
    eps = torch.finfo(torch.float32).eps
    # The clamp keeps the gradient finite at x = 0 (as the official release).
    mag_sq = torch.clamp_min(torch.sum(x**2, dim=-1, keepdim=True), eps)
    mag = torch.sqrt(mag_sq)
    scale = torch.where(mag_sq <= 1, torch.ones_like(mag), (2 - 1 / mag) / mag)
    return scale * x


def contract_jacobian(x):
    """The Jacobian of `contract` at x: `[..., C, C]`.

    The identity inside the unit ball; outside, with r = ||x|| and u = x / r, the radial
    derivative is 1/r^2 and the tangential scale (2 - 1/r)/r:
    J = (2 - 1/r)/r (I - u u^T) + u u^T / r^2 (symmetric).
    """
    eps = torch.finfo(torch.float32).eps
    mag_sq = torch.clamp_min(torch.sum(x**2, dim=-1, keepdim=True), eps)
    mag = torch.sqrt(mag_sq)
    u = x / mag
    uu = u[..., :, None] * u[..., None, :]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    outside = ((2 - 1 / mag) / mag)[..., None] * (eye - uu) + (1 / mag_sq)[..., None] * uu
    return torch.where((mag_sq <= 1)[..., None], eye, outside)


def track_linearize(fn, mean, cov):
    """Push Gaussians through `fn` by linearizing it at their means (Sec. 2, as a Kalman filter).

    fn(x) ~ fn(mean) + J (x - mean), J the Jacobian of fn at mean, so the Gaussian maps to
    (fn(mean), J cov J^T). For `contract` J is `contract_jacobian`; any other pointwise fn (one
    that maps `[..., C]` to `[..., D]` point by point and can run under torch.func.vmap) gets J
    from torch.func.jacrev (forward mode would warn: its decompositions use torch.jit.script in
    torch 2.13). Gradients flow to mean and cov either way.

    Args:
      fn: the warp, e.g. `contract`.
      mean: `[..., C]`; cov: `[..., C, C]` full covariances.

    Returns:
      fn_mean `[..., D]`, fn_cov `[..., D, D]`.
    """
    if cov.dim() != mean.dim() + 1:
        raise ValueError(f'cov must be full, [..., C, C], for means [..., C]; got {tuple(cov.shape)}')
    if fn is contract:
        jac = contract_jacobian(mean)
    else:
        flat = mean.reshape(-1, mean.shape[-1])
        jac = torch.func.vmap(torch.func.jacrev(fn))(flat)
        jac = jac.reshape(mean.shape[:-1] + jac.shape[-2:])
    return fn(mean), jac @ cov @ jac.transpose(-1, -2)


def _piecewise_fwd(t):
    # Identity-like (t/2) below 1, disparity-like above: allows t_near = 0.
    return torch.where(t < 1, 0.5 * t, 1 - 0.5 / torch.clamp_min(t, 1))


def _piecewise_inv(s):
    return torch.where(s < 0.5, 2 * s, 0.5 / (1 - torch.clamp_min(s, 0.5)))


def _identity(x):
    return x


_RAY_WARPS = {
    'reciprocal': (torch.reciprocal, torch.reciprocal),
    'log': (torch.log, torch.exp),
    'exp': (torch.exp, torch.log),
    'sqrt': (torch.sqrt, torch.square),
    'square': (torch.square, torch.sqrt),
    'piecewise': (_piecewise_fwd, _piecewise_inv),
}
_RAY_WARPS_BY_FN = {fwd: (fwd, inv) for fwd, inv in _RAY_WARPS.values()}


def construct_ray_warps(fn, t_near, t_far):
    """The bijection between metric ray distance t and normalized distance s in [0, 1] (Eq. 11).

    s = (g(t) - g(t_near)) / (g(t_far) - g(t_near)). mip-NeRF 360 uses g = 1/t
    (fn=torch.reciprocal): sampling uniformly in s is sampling uniformly in disparity, and with
    `contract` evenly spaced s along a ray from the unit sphere to infinity map to evenly spaced
    contracted points (Fig. 2).

    Args:
      fn: None (identity), 'piecewise' (t/2 below 1, 1 - 1/(2t) above; allows t_near = 0), or g
        as one of torch.reciprocal, torch.log, torch.exp, torch.sqrt, torch.square or their
        names.
      t_near, t_far: tensors (e.g. `[..., 1]`), broadcast against the distances; t_far may be inf
        for g = 1/t.

    Returns:
      t_to_s, s_to_t: functions of tensors that broadcast against t_near.
    """
    if fn is None:
        fn_fwd = fn_inv = _identity
    elif isinstance(fn, str) and fn in _RAY_WARPS:
        fn_fwd, fn_inv = _RAY_WARPS[fn]
    elif not isinstance(fn, str) and fn in _RAY_WARPS_BY_FN:
        fn_fwd, fn_inv = _RAY_WARPS_BY_FN[fn]
    else:
        raise ValueError(f'no inverse known for the ray warp {fn!r}: use None, {", ".join(_RAY_WARPS)}')
    s_near, s_far = fn_fwd(t_near), fn_fwd(t_far)

    def t_to_s(t):
        return (fn_fwd(t) - s_near) / (s_far - s_near)

    def s_to_t(s):
        return fn_inv(s * s_far + (1 - s) * s_near)

    return t_to_s, s_to_t


# The regular icosahedron (vertices at unit distance) and its faces, in the official release's
# order, which fixes the order of the basis directions and hence of the encoding's features.
_PHI = (math.sqrt(5) + 1) / 2
_ICOSAHEDRON_VERTS = [
    (-1, 0, _PHI), (1, 0, _PHI), (-1, 0, -_PHI), (1, 0, -_PHI), (0, _PHI, 1), (0, _PHI, -1),
    (0, -_PHI, 1), (0, -_PHI, -1), (_PHI, 1, 0), (-_PHI, 1, 0), (_PHI, -1, 0), (-_PHI, -1, 0),
]  # fmt: skip
_ICOSAHEDRON_FACES = [
    (0, 4, 1), (0, 9, 4), (9, 5, 4), (4, 5, 8), (4, 8, 1), (8, 10, 1), (8, 3, 10), (5, 3, 8), (5, 2, 3), (2, 7, 3),
    (7, 10, 3), (7, 6, 10), (7, 11, 6), (11, 0, 6), (0, 1, 6), (6, 1, 10), (9, 0, 11), (9, 11, 2), (9, 2, 5),
    (7, 2, 11),
]  # fmt: skip
_OCTAHEDRON_VERTS = [(0, 0, -1), (0, 0, 1), (0, -1, 0), (0, 1, 0), (-1, 0, 0), (1, 0, 0)]
# Each face is one octant's three vertices; this order is the one the official release computes.
_OCTAHEDRON_FACES = [(0, 2, 4), (1, 2, 5), (0, 3, 4), (1, 3, 4), (0, 2, 5), (1, 2, 4), (0, 3, 5), (1, 3, 5)]


def _sq_dist(a, b):
    """Squared distances between the rows of a `[N, C]` and b `[M, C]`: `[N, M]`."""
    return torch.sum((a[:, None, :] - b[None, :, :]) ** 2, dim=-1)


def _tesselate_geodesic(verts, faces, v, eps):
    """The vertices of the geodesic polyhedron: each face split into v^2 triangles, projected
    onto the unit sphere, duplicates (on shared edges) merged into their first occurrence."""
    # Barycentric weights (i, j, v - i - j) / v in the official release's order.
    bary = [(i, j, v - i - j) for i in range(v + 1) for j in range(v + 1 - i)]
    bary = torch.tensor(bary, dtype=verts.dtype) / v
    new = torch.einsum('tk,fkc->ftc', bary, verts[torch.tensor(faces)]).reshape(-1, verts.shape[-1])
    new = new / torch.linalg.norm(new, dim=-1, keepdim=True)
    first = (_sq_dist(new, new) <= eps).to(torch.int64).argmax(dim=1)  # First index of each point's copies.
    return new[torch.unique(first)]


def generate_basis(
    base_shape='icosahedron', angular_tesselation=2, remove_symmetries=True, eps=1e-4, dtype=None, device=None
):
    """Unit directions of a tessellated polyhedron, the projection basis of mip-NeRF 360's IPE.

    The official release's `geopoly.generate_basis`: the faces of the polyhedron are split
    `angular_tesselation` times along each edge, the vertices projected onto the unit sphere and
    merged, and of each antipodal pair only the first is kept (the other would give the same
    features up to sign). Its models use 'icosahedron' with 2: 42 vertices (the 12 of the
    icosahedron and its 30 normalized edge midpoints), 21 directions.

    Args:
      base_shape: 'icosahedron' or 'octahedron' (with 1: the three axes).
      angular_tesselation: int >= 1 (1 keeps the polyhedron's vertices).

    Returns:
      `[3, K]` basis: column k is a unit direction (the transpose of the release's `[K, 3]`, as
      its models use it).
    """
    if not isinstance(angular_tesselation, int) or angular_tesselation < 1:
        raise ValueError(f'angular_tesselation must be an integer >= 1, got {angular_tesselation!r}')
    f64 = torch.float64
    if base_shape == 'icosahedron':
        verts = torch.tensor(_ICOSAHEDRON_VERTS, dtype=f64) / math.sqrt(_PHI + 2)
        faces = _ICOSAHEDRON_FACES
    elif base_shape == 'octahedron':
        verts, faces = torch.tensor(_OCTAHEDRON_VERTS, dtype=f64), _OCTAHEDRON_FACES
    else:
        raise ValueError(f"base_shape must be 'icosahedron' or 'octahedron', got {base_shape!r}")
    verts = _tesselate_geodesic(verts, faces, angular_tesselation, eps)
    if remove_symmetries:
        antipodal = _sq_dist(verts, -verts) < eps
        verts = verts[torch.triu(antipodal).any(dim=1)]  # Keep the first of each pair.
    basis = verts.flip(-1)  # The release reverses the coordinates (z, y, x).
    return basis.T.to(dtype=dtype or torch.get_default_dtype(), device=device).contiguous()


def lift_and_diagonalize(mean, cov, basis):
    """Project Gaussians onto the directions of `basis` and keep the variances only.

    For each column b of the basis, b^T x ~ N(b^T mean, b^T cov b): the input of mip-NeRF 360's
    IPE (which ignores the correlations between directions).

    Args:
      mean: `[..., C]`; cov: `[..., C, C]` full or `[..., C]` diagonal; basis: `[C, K]`.

    Returns:
      lifted means `[..., K]`, lifted variances `[..., K]`.
    """
    fn_mean = mean @ basis
    if cov.dim() == mean.dim():
        return fn_mean, cov @ basis**2
    return fn_mean, torch.sum(basis * (cov @ basis), dim=-2)


def integrated_pos_enc_basis(mean, cov, basis, min_deg, max_deg):
    """mip-NeRF 360's IPE: `integrated_pos_enc` of the Gaussians lifted onto `basis`.

    The release's coord.integrated_pos_enc has the layout of `integrated_pos_enc` here (the sin
    block then the cos block, each ordered (degree, direction); its cos is sin(x + pi/2) and its
    sin reduces |x| >= 100 pi modulo 100 pi, which changes values only by rounding).

    Args:
      mean: `[..., C]`; cov: `[..., C, C]` or `[..., C]`; basis: `[C, K]`.

    Returns:
      `[..., 2*K*(max_deg-min_deg)]`.
    """
    return integrated_pos_enc(*lift_and_diagonalize(mean, cov, basis), min_deg, max_deg)
