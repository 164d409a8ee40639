"""mip-NeRF 360 (Barron et al., CVPR 2022): unbounded scenes with proposal sampling.

Faithful to the official release (google-research/multinerf, `internal/models.py`,
`internal/render.py`, `configs/360.gin`). Each ray starts as one interval [0, 1] of normalized
distance s (uniform in disparity: `ray_utils.construct_ray_warps` with 1/t, so that s = 1 is
`far`). Each of `num_levels - 1` proposal rounds dilates the previous level's histogram
(`stepfun.max_dilate_weights`), anneals it over training, draws `num_prop_samples` intervals from
it (`stepfun.sample_intervals`, one jitter per ray in training, evenly spaced in evaluation), casts
them as Gaussians, contracts those into the ball of radius 2 (`ray_utils.contract`, linearized:
`track_linearize`), lifts them onto an icosahedral basis and featurizes them by IPE; the proposal
MLP (density only) gives the next histogram. The NeRF MLP does the same on `num_samples` intervals
of the last round and also predicts colour. Training losses (`loss360` below): Charbonnier on the
final colour, the interlevel loss between each proposal histogram and the final one (Eq. 13), the
distortion loss of the final one (Eq. 15); no gradient flows between levels.
"""

import torch

import ray_utils
import stepfun
from loss import weighted_mean
from model import MLP, Renderer


def composite(rgb, weights, t, bg):
    """Colour `[..., 3]`, distance `[...]` and opacity `[...]` of one level.

    The distance is the weights' expected log-distance, exponentiated and
    clipped to the ray's extent, as multinerf's `distance_mean` (stable over
    t up to `far` = 1e6); where nothing was hit it is the far end.
    """
    acc = weights.sum(-1)
    out_rgb = (weights[..., None] * rgb).sum(-2) + (1 - acc[..., None]).clamp_min(0) * bg
    t_mids = 0.5 * (t[..., :-1] + t[..., 1:])
    eps = torch.finfo(weights.dtype).eps
    distance = torch.exp((weights * torch.log(t_mids)).sum(-1) / acc.clamp_min(eps))
    distance = torch.nan_to_num(distance, nan=torch.inf, posinf=torch.inf)
    distance = torch.minimum(torch.maximum(distance, t[..., 0]), t[..., -1])
    return out_rgb, distance, acc


class MipNeRF360(Renderer):
    """Proposal MLP(s) then the NeRF MLP, on contracted Gaussians. Randomized (jitter, density noise)
    only in training mode and only if `randomized`; `model.eval()` renders deterministically."""

    def __init__(self, args, randomized=True):
        """args: a `config.ModelArgs` with model='mipnerf360'."""
        super().__init__()
        a = self.args = args
        self.randomized = randomized
        self.bf16 = False  # the MLPs under bfloat16 autocast (runs.set_precision)
        self.register_buffer('basis', ray_utils.generate_basis('icosahedron', 2), persistent=False)
        x_dim = 2 * self.basis.shape[-1] * (a.max_deg_point - a.min_deg_point)
        cond_dim = 3 + 2 * 3 * a.deg_view if a.use_viewdirs else 0
        self.prop_mlp = MLP(x_dim, 0, a.prop_net_depth, a.prop_net_width, a.skip_layer, rgb=False, init=a.init)
        self.mlp = MLP(
            x_dim,
            cond_dim,
            a.net_depth,
            a.net_width,
            a.skip_layer,
            a.net_depth_condition,
            a.net_width_condition,
            bottleneck_width=a.bottleneck_width or None,
            init=a.init,
        )

    def query(self, mean, cov, mlp, view_enc, randomized):
        """Colour `[..., S, 3]` (None for a proposal MLP) and density `[..., S]` of Gaussians
        (mean `[..., S, 3]`, covariance `[..., S, 3, 3]`), contracted, lifted onto the basis, IPE'd."""
        a = self.args
        mean, cov = ray_utils.track_linearize(ray_utils.contract, mean, cov)
        x = ray_utils.integrated_pos_enc_basis(mean, cov, self.basis, a.min_deg_point, a.max_deg_point)
        return self.activate(mlp, x, view_enc, randomized)

    def forward(self, rays, normals=False, train_frac=1.0, history=False):
        """Render a batch of rays through every level.

        Args:
          rays: `ray_utils.Rays` with leading shape `[...]` (near, far `[..., 1]`).
          normals: also return, for the last level, the composited normal (the
            normalized negative gradient of the density with respect to the
            Gaussians' means, before the contraction).
          train_frac: the fraction of training done, for the annealing (1 when rendering).
          history: also return each level's (s endpoints `[..., S+1]`, weights `[..., S]`).

        Returns:
          [(rgb `[..., 3]`, distance `[...]`, acc `[...]`) per level], proposals first (their
          colour is the background's); with `normals` the last tuple ends with normals
          `[..., 3]`; with `history`, (that list, [(sdist, weights) per level]).
        """
        a = self.args
        randomized = self.randomized and self.training
        _, s_to_t = ray_utils.construct_ray_warps(torch.reciprocal, rays.near, rays.far)
        view_enc = ray_utils.pos_enc(rays.viewdirs, 0, a.deg_view, True) if a.use_viewdirs else None
        bg = 1.0 if a.white_bkgd else 0.0
        sdist = torch.cat([torch.zeros_like(rays.near), torch.ones_like(rays.far)], -1)
        weights = torch.ones_like(rays.near)
        prod_num_samples = 1
        levels, ray_history = [], []
        for level in range(a.num_levels):
            is_prop = level < a.num_levels - 1
            num_samples = a.num_prop_samples if is_prop else a.num_samples
            # Dilate the histogram by the expected span of its intervals (plus a bias), so that it bounds
            # the next level's from above (less aliasing); then anneal it from uniform over training.
            dilation = a.dilation_bias + a.dilation_multiplier / prod_num_samples
            prod_num_samples *= num_samples
            # No graph is recorded for the resampling when its result is detached (stop_level_grad): the
            # dilation alone would hold a [..., 3S+1, S] tensor per round for a backward that never comes.
            with torch.set_grad_enabled(torch.is_grad_enabled() and not a.stop_level_grad):
                if level > 0 and (a.dilation_bias > 0 or a.dilation_multiplier > 0):
                    sdist, weights = stepfun.max_dilate_weights(
                        sdist, weights, dilation, domain=(0.0, 1.0), renormalize=True
                    )
                    sdist, weights = sdist[..., 1:-1], weights[..., 1:-1]
                if a.anneal_slope > 0:  # Schlick's bias function of the training fraction
                    anneal = a.anneal_slope * train_frac / ((a.anneal_slope - 1) * train_frac + 1)
                else:
                    anneal = 1.0
                logits = torch.where(
                    sdist[..., 1:] > sdist[..., :-1], anneal * torch.log(weights + a.resample_padding), -torch.inf
                )
                sdist = stepfun.sample_intervals(
                    sdist, logits, num_samples, single_jitter=a.single_jitter, domain=(0.0, 1.0), rand=randomized
                )
            tdist = s_to_t(sdist)
            mean, cov = ray_utils.cast_rays(tdist, rays.origins, rays.directions, rays.radii, a.ray_shape, diag=False)
            if a.disable_integration:
                cov = torch.zeros_like(cov)
            mlp, cond = (self.prop_mlp, None) if is_prop else (self.mlp, view_enc)
            want_normals = normals and not is_prop
            if want_normals:
                rgb, density, n = self.with_normals(self.query, mean, cov, mlp, cond, randomized)
            else:
                rgb, density = self.query(mean, cov, mlp, cond, randomized)
            weights = ray_utils.compute_alpha_weights(density, tdist, rays.directions, a.opaque_background)
            if rgb is None:
                rgb = torch.zeros_like(mean)
            out = composite(rgb, weights, tdist, bg)
            if want_normals:
                out = out + ((weights[..., None] * n).sum(-2),)
            levels.append(out)
            ray_history.append((sdist, weights))
        return (levels, ray_history) if history else levels


def loss360(levels, ray_history, target, lossmult, charb_padding, interlevel_mult, distortion_mult):
    """multinerf's training loss with its defaults: the Charbonnier data term of the final colour,
    plus the interlevel loss of each proposal histogram against the final one (whose weights and
    endpoints get no gradient from it: `stepfun.lossfun_outer`, Eq. 13), plus the distortion loss of
    the final histogram (`stepfun.lossfun_distortion`, Eq. 15).

    Returns (loss, final level's MSE) (scalars).
    """
    resid_sq = (levels[-1][0] - target) ** 2
    mse = weighted_mean(resid_sq, lossmult)
    data = weighted_mean(torch.sqrt(resid_sq + charb_padding**2), lossmult)
    c, w = ray_history[-1]
    interlevel = sum(stepfun.lossfun_outer(c.detach(), w.detach(), cp, wp).mean() for cp, wp in ray_history[:-1])
    distortion = stepfun.lossfun_distortion(c, w).mean()
    return data + interlevel_mult * interlevel + distortion_mult * distortion, mse
