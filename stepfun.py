"""Step functions along rays: the histograms of mip-NeRF 360's proposal sampling and losses.

Pure tensor functions: every function works along the last axis, takes any leading batch shape
`...` (broadcast between arguments where it makes sense), works on any device and in float32 or
float64, and keeps no state. They follow google-research/multinerf's `internal/stepfun.py`
(Barron et al., "Mip-NeRF 360: Unbounded Anti-Aliased Neural Radiance Fields", CVPR 2022).

Vocabulary (as multinerf's):
  t         the sorted endpoints ("fenceposts") of S intervals, `[..., S+1]`; interval i is
            [t[i], t[i+1]).
  w         non-negative weights of the intervals, summing to <= 1, `[..., S]` (volume-rendering
            weights, or a proposal histogram).
  p         densities w / diff(t): the value of the step function on each interval, which
            integrates to <= 1, `[..., S]`.
  y         any values of the intervals, `[..., S]`.
  w_logits  unnormalized log-weights, `[..., S]`; -inf for an interval that must get no sample.
  u         CDF values in [0, 1).
"""

import torch

# multinerf's tolerances are float32's whatever the dtype.
_EPS = torch.finfo(torch.float32).eps


def _take(x, idx):
    """`x[..., idx]` along the last axis, broadcasting the leading dimensions of x and idx."""
    ndim = max(x.dim(), idx.dim())
    x = x.reshape((1,) * (ndim - x.dim()) + x.shape)
    idx = idx.reshape((1,) * (ndim - idx.dim()) + idx.shape)
    return torch.take_along_dim(x, idx, dim=-1)


def searchsorted(a, v):
    """The interval of the sorted `a` that holds each `v`, clamped to the ends.

    Args:
      a: `[..., N]` sorted reference points.
      v: `[..., M]` queries (need not be sorted); the leading dimensions of a and v broadcast.

    Returns:
      (idx_lo, idx_hi), each `[..., M]` int64: a[idx_lo] <= v < a[idx_hi] when
      a[0] <= v < a[-1]; both 0 when v < a[0] and both N - 1 when v >= a[-1]. idx_hi is
      torch.searchsorted(a, v, right=True) wherever that is a valid index.
    """
    batch = torch.broadcast_shapes(a.shape[:-1], v.shape[:-1])
    a = a.expand(batch + a.shape[-1:]).contiguous()
    v = v.expand(batch + v.shape[-1:]).contiguous()
    n = a.shape[-1]
    above = torch.searchsorted(a, v, right=True)  # The number of a <= v.
    idx_lo = (above - 1).clamp_min(0)
    idx_hi = above.clamp_max(n - 1)
    return idx_lo, idx_hi


def query(tq, t, y, outside_value=0):
    """The values of the step function (t, y) at the points `tq` `[..., Q]`.

    Outside [t[0], t[-1]) the value is `outside_value`. Returns `[..., Q]`.
    """
    idx_lo, idx_hi = searchsorted(t, tq)
    yq = _take(y, idx_lo.clamp_max(y.shape[-1] - 1))
    return torch.where(idx_lo == idx_hi, torch.as_tensor(outside_value, dtype=yq.dtype, device=yq.device), yq)


def inner_outer(t0, t1, y1):
    """The inner and outer measures of the step function (t1, y1) on the intervals of t0.

    For interval i of t0, the outer measure is the sum of y1 over every interval of t1 that
    overlaps it (the "bound" of Eq. 12 of the paper), the inner measure the sum over those inside
    it. For non-negative y1 and any density that is constant on the intervals of t1 and sums to y1
    on them, inner <= the integral over interval i <= outer.

    Args:
      t0: `[..., S0+1]` endpoints to measure; t1: `[..., S1+1]`, y1: `[..., S1]`.

    Returns:
      y0_inner, y0_outer: `[..., S0]`.
    """
    cy1 = torch.cat([torch.zeros_like(y1[..., :1]), torch.cumsum(y1, dim=-1)], dim=-1)
    idx_lo, idx_hi = searchsorted(t1, t0)
    cy1_lo = _take(cy1, idx_lo)
    cy1_hi = _take(cy1, idx_hi)
    y0_outer = cy1_hi[..., 1:] - cy1_lo[..., :-1]
    y0_inner = torch.where(
        idx_hi[..., :-1] <= idx_lo[..., 1:], cy1_lo[..., 1:] - cy1_hi[..., :-1], torch.zeros_like(y0_outer)
    )
    return y0_inner, y0_outer


def lossfun_outer(t, w, t_env, w_env, eps=_EPS):
    """The proposal loss of Eq. 13: the excess of w over its bound from the envelope (t_env, w_env).

    L = max(0, w - bound(t, t_env, w_env))^2 / (w + eps) per interval, with the bound of Eq. 12
    (the outer measure). It is zero where the proposal histogram (t_env, w_env) upper-bounds the
    NeRF's weights (t, w). multinerf (train_utils.interlevel_loss) averages it over rays and
    intervals, sums that over the proposal levels, and stops the gradient into (t, w): only the
    proposal weights w_env learn from it.

    Args:
      t: `[..., S+1]`, w: `[..., S]`: the NeRF histogram; t_env: `[..., E+1]`, w_env: `[..., E]`.

    Returns:
      `[..., S]`.
    """
    _, w_outer = inner_outer(t, t_env, w_env)
    # w_inner <= w is not penalized: pulling w_outer up works better than pushing w_inner down.
    return torch.clamp_min(w - w_outer, 0) ** 2 / (w + eps)


def weight_to_pdf(t, w, eps=_EPS**2):
    """Weights `[..., S]` to densities: w / max(eps, diff(t))."""
    return w / torch.clamp_min(t[..., 1:] - t[..., :-1], eps)


def pdf_to_weight(t, p):
    """Densities `[..., S]` to weights: p * diff(t)."""
    return p * (t[..., 1:] - t[..., :-1])


def max_dilate(t, w, dilation, domain=(-float('inf'), float('inf'))):
    """Dilate a non-negative step function by max-pooling over a window of half-width `dilation`.

    The result f_d(x) = max{f(u) : u - dilation < x <= u + dilation}, as an exact step function
    on the endpoints t, t - dilation and t + dilation, clamped to `domain` (which moves endpoints
    but never adds mass outside it).

    Args:
      t: `[..., S+1]`; w: `[..., S]` non-negative values; dilation: a float or a tensor that
        broadcasts against `[..., 1]`; domain: (lo, hi).

    Returns:
      t_dilate `[..., 3S+1]`, w_dilate `[..., 3S]`.
    """
    t0 = t[..., :-1] - dilation
    t1 = t[..., 1:] + dilation
    t_dilate = torch.sort(torch.cat([t, t0, t1], dim=-1), dim=-1).values
    t_dilate = torch.clamp(t_dilate, *domain)
    # The value on [t_dilate[k], t_dilate[k+1]) is the max over the dilated intervals holding t_dilate[k].
    inside = (t0[..., None, :] <= t_dilate[..., :, None]) & (t1[..., None, :] > t_dilate[..., :, None])
    w_dilate = torch.where(inside, w[..., None, :], torch.zeros_like(w[..., None, :])).amax(dim=-1)[..., :-1]
    return t_dilate, w_dilate


def max_dilate_weights(t, w, dilation, domain=(-float('inf'), float('inf')), renormalize=False, eps=_EPS**2):
    """Dilate the weights (t, w) by max-pooling their densities (`max_dilate` of the pdf).

    multinerf dilates each proposal histogram before resampling the next level (models.py:
    dilation = dilation_bias + dilation_multiplier * (s_far - s_near) / prod(num_samples of the
    levels so far), domain (s_near, s_far), renormalize=True, then the first and last endpoint
    and weight are dropped), so that the histogram over-estimates the next one (less aliasing).

    Returns:
      t_dilate `[..., 3S+1]`, w_dilate `[..., 3S]` (summing to 1 with `renormalize`).
    """
    p = weight_to_pdf(t, w)
    t_dilate, p_dilate = max_dilate(t, p, dilation, domain=domain)
    w_dilate = pdf_to_weight(t_dilate, p_dilate)
    if renormalize:
        w_dilate = w_dilate / torch.clamp_min(w_dilate.sum(dim=-1, keepdim=True), eps)
    return t_dilate, w_dilate


def integrate_weights(w):
    """The CDF at the endpoints of weights w `[..., S]` that sum to 1: `[..., S+1]`.

    The first value is exactly 0 and the last exactly 1 (the inner ones are clamped to <= 1);
    weights that do not sum to 1 are silently treated as if the last one made up the difference.
    """
    cw = torch.clamp_max(torch.cumsum(w[..., :-1], dim=-1), 1)
    zeros = torch.zeros_like(w[..., :1])
    return torch.cat([zeros, cw, torch.ones_like(zeros)], dim=-1)


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of (xp, fp) at x, along the last axis, with sorted xp.

    Where xp repeats, x interpolates between the last xp <= x and the first xp > x; outside the
    range it takes the end values (multinerf's math.sorted_interp). Gradients stay finite.
    """
    idx_lo, idx_hi = searchsorted(xp, x)
    xp0, xp1 = _take(xp, idx_lo), _take(xp, idx_hi)
    fp0, fp1 = _take(fp, idx_lo), _take(fp, idx_hi)
    dx = xp1 - xp0
    ok = dx > 0
    offset = torch.where(ok, (x - xp0) / torch.where(ok, dx, torch.ones_like(dx)), torch.zeros_like(dx))
    return fp0 + offset.clamp(0, 1) * (fp1 - fp0)


def invert_cdf(u, t, w_logits):
    """The inverse CDF of the histogram (t, softmax(w_logits)) at u `[..., N]` in [0, 1).

    The CDF is piecewise linear (the density is piecewise constant), so is its inverse.
    Returns `[..., N]` in [t[0], t[-1]].
    """
    cw = integrate_weights(torch.softmax(w_logits, dim=-1))
    return _interp(u, cw, t)


def sample(t, w_logits, num_samples, single_jitter=False, deterministic_center=False, rand=False, generator=None):
    """Draw `num_samples` sorted points from the piecewise-constant density (t, softmax(w_logits)).

    Randomized (training) when `rand` or a `generator` is given: stratified, u_k = (k + jitter)
    / N spanning [0, 1), with one jitter per ray (`single_jitter`) or one per sample.
    Deterministic (evaluation) otherwise: evenly spaced u = linspace(0, 1 - eps), or with
    `deterministic_center` the centres of N equal strata, u = linspace(1/2N, 1 - 1/2N - eps), so
    that each sample sits at the median of its 1/N of the mass.

    Args:
      t: `[..., S+1]` sorted endpoints; w_logits: `[..., S]`; the leading dimensions broadcast.

    Returns:
      `[..., num_samples]` sorted samples in [t[0], t[-1]].
    """
    batch = torch.broadcast_shapes(t.shape[:-1], w_logits.shape[:-1])
    kw = dict(dtype=t.dtype, device=t.device)
    n = num_samples
    if rand or generator is not None:
        if n == 1:  # multinerf's formula divides by n - 1 (NaN): draw u uniformly in [0, 1).
            u = torch.rand(batch + (1,), generator=generator, **kw) * (1 - _EPS)
        else:
            # u can be 0 but never 1: the largest stratum start is 1 - u_max, the jitter < its width.
            u_max = _EPS + (1 - _EPS) / n
            max_jitter = (1 - u_max) / (n - 1) - _EPS
            jitter = torch.rand(batch + (1 if single_jitter else n,), generator=generator, **kw) * max_jitter
            u = torch.linspace(0, 1 - u_max, n, **kw) + jitter
    else:
        if deterministic_center:
            pad = 1 / (2 * n)
            u = torch.linspace(pad, 1 - pad - _EPS, n, **kw)
        else:
            u = torch.linspace(0, 1 - _EPS, n, **kw)
        u = u.expand(batch + (n,))
    return invert_cdf(u, t, w_logits)


def sample_intervals(
    t, w_logits, num_samples, single_jitter=False, domain=(-float('inf'), float('inf')), rand=False, generator=None
):
    """Draw `num_samples` intervals (not points) from the histogram (t, softmax(w_logits)).

    The centres are `sample(..., deterministic_center=True)`; the endpoints are the midpoints
    between adjacent centres, and the first and last are the reflections of the first and last
    midpoint about the first and last centre, clamped to `domain`. This is how multinerf draws
    every level's intervals in normalized ray distance s (Sec. 3 of the paper).

    Returns:
      `[..., num_samples+1]` sorted endpoints.
    """
    if num_samples <= 1:
        raise ValueError(f'num_samples must be > 1, got {num_samples}')
    centers = sample(t, w_logits, num_samples, single_jitter, deterministic_center=True, rand=rand, generator=generator)
    mid = (centers[..., 1:] + centers[..., :-1]) / 2
    minval, maxval = domain
    first = torch.clamp_min(2 * centers[..., :1] - mid[..., :1], minval)
    last = torch.clamp_max(2 * centers[..., -1:] - mid[..., -1:], maxval)
    return torch.cat([first, mid, last], dim=-1)


def lossfun_distortion(t, w):
    """The distortion loss of Eqs. 14-15: the integral of w(u) w(v) |u - v| over u and v.

    For the step function with weight w_i uniform on [t_i, t_i+1] this is exactly
    sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (t_i+1 - t_i), m the midpoints (Eq. 15). The
    double sum is computed in O(S): the midpoints are sorted, so it is 2 sum_k (m_k+1 - m_k)
    W_k (W - W_k), W_k the weight at or left of interval k, a sum of non-negative terms
    (no cancellation, even far from the origin). multinerf applies it to the last level's
    normalized distances s and weights, averaged over rays.

    Args:
      t: `[..., S+1]` sorted; w: `[..., S]`.

    Returns:
      `[...]`.
    """
    gaps = (t[..., 2:] - t[..., :-2]) / 2  # m[k+1] - m[k], [..., S-1].
    left = torch.cumsum(w, dim=-1)[..., :-1]  # sum_{j <= k} w_j.
    right = torch.flip(torch.cumsum(torch.flip(w, [-1]), dim=-1), [-1])[..., 1:]  # sum_{j > k} w_j.
    loss_inter = 2 * torch.sum(gaps * left * right, dim=-1)
    loss_intra = torch.sum(w**2 * (t[..., 1:] - t[..., :-1]), dim=-1) / 3
    return loss_inter + loss_intra


def interval_distortion(t0_lo, t0_hi, t1_lo, t1_hi):
    """E|x - y| for x ~ U[t0_lo, t0_hi] and y ~ U[t1_lo, t1_hi] independent (broadcast shapes).

    Disjoint (or touching) intervals: the distance between the midpoints. Overlapping ones:
    with h(z) = |z|^3 / 6, whose mixed second derivative in (x, y) of h(x - y) is -|x - y|,
    the double integral is h(a1 - b0) + h(a0 - b1) - h(a1 - b1) - h(a0 - b0), divided by the
    two widths; a zero-width interval (a point x in [b0, b1]) gives ((x - b0)^2 + (b1 - x)^2) /
    (2 (b1 - b0)). Exact in each case; every form is translation-invariant.
    """
    a0, a1, b0, b1 = torch.broadcast_tensors(t0_lo, t0_hi, t1_lo, t1_hi)
    d_disjoint = torch.abs((b0 + b1) / 2 - (a0 + a1) / 2)
    len0, len1 = a1 - a0, b1 - b0

    def safe(den):
        return torch.where(den > 0, den, torch.ones_like(den))

    cube = torch.abs(a1 - b0) ** 3 + torch.abs(a0 - b1) ** 3 - torch.abs(a1 - b1) ** 3 - torch.abs(a0 - b0) ** 3
    d_overlap = cube / (6 * safe(len0 * len1))
    d_point0 = ((a0 - b0) ** 2 + (b1 - a0) ** 2) / (2 * safe(len1))  # a0 == a1 inside [b0, b1].
    d_point1 = ((b0 - a0) ** 2 + (a1 - b0) ** 2) / (2 * safe(len0))  # b0 == b1 inside [a0, a1].
    disjoint = (a0 >= b1) | (b0 >= a1)
    d = torch.where(len0 > 0, torch.where(len1 > 0, d_overlap, d_point1), d_point0)
    return torch.where(disjoint, d_disjoint, d)


def weighted_percentile(t, w, ps):
    """The percentiles `ps` (in [0, 100]) of the histogram (t, w), whose w sum to 1.

    Args:
      t: `[..., S+1]`; w: `[..., S]`; ps: a sequence or tensor of P percentiles.

    Returns:
      `[..., P]`: the inverse of the piecewise-linear CDF at ps / 100.
    """
    cw = integrate_weights(w)
    ps = torch.as_tensor(ps, dtype=cw.dtype, device=cw.device).reshape(-1) / 100
    batch = torch.broadcast_shapes(t.shape[:-1], w.shape[:-1])
    return _interp(ps.expand(batch + ps.shape), cw, t)
