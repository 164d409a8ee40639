"""The mip-NeRF model: one MLP shared by the coarse and fine levels.

Architecture and defaults follow the paper and the official release
(google/mipnerf, `internal/models.py`). The network is built from a
`config.ModelArgs` (any object with its fields), which every checkpoint
carries, so a checkpoint alone rebuilds it (`runs.load_model`).
"""

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

import fused_mlp
import ray_utils


def _dense(in_features, out_features, init='glorot'):
    """A linear layer with zero biases and Glorot-uniform (mip-NeRF) or He-uniform (mip-NeRF 360) weights."""
    layer = nn.Linear(in_features, out_features)
    if init == 'glorot':
        nn.init.xavier_uniform_(layer.weight)
    else:  # he_uniform: U(-sqrt(6 / fan_in), sqrt(6 / fan_in))
        nn.init.kaiming_uniform_(layer.weight, nonlinearity='relu')
    nn.init.zeros_(layer.bias)
    return layer


def _linear_of_concat(a, b, layer):
    """layer(cat([a, b], -1)) without the copy: W_a a + W_b b + bias, two GEMMs."""
    w, k = layer.weight, a.shape[-1]
    out = F.linear(b, w[:, k:], layer.bias)
    out = torch.addmm(out.reshape(-1, out.shape[-1]), a.reshape(-1, k), w[:, :k].t())
    return out.view(a.shape[:-1] + (w.shape[0],))


class MLP(nn.Module):
    """The NeRF MLP: a trunk (8x256 in mip-NeRF), density head, bottleneck and view branch.

    The encoded input is concatenated to the output of trunk layer
    `skip_layer` (0-based, so the fifth layer with the default 4), which feeds
    the sixth layer, exactly as `i % skip_layer == 0 and i > 0` in the
    official releases. `rgb=False` (mip-NeRF 360's proposal MLP) keeps the
    density head only; `bottleneck_width` defaults to the trunk's width.
    """

    def __init__(
        self,
        x_dim,
        cond_dim,
        net_depth,
        net_width,
        skip_layer,
        net_depth_condition=1,
        net_width_condition=128,
        bottleneck_width=None,
        rgb=True,
        init='glorot',
    ):
        super().__init__()
        self.skip_layer = skip_layer
        layers, in_dim = [], x_dim
        for i in range(net_depth):
            layers.append(_dense(in_dim, net_width, init))
            in_dim = net_width + (x_dim if self._skip_after(i) else 0)
        self.trunk = nn.ModuleList(layers)
        self.density = _dense(in_dim, 1, init)
        self.has_rgb = rgb
        self.use_viewdirs = rgb and cond_dim > 0
        if self.use_viewdirs:
            width = bottleneck_width or net_width
            self.bottleneck = _dense(in_dim, width, init)
            cond, c_in = [], width + cond_dim
            for _ in range(net_depth_condition):
                cond.append(_dense(c_in, net_width_condition, init))
                c_in = net_width_condition
            self.condition = nn.ModuleList(cond)
            in_dim = c_in
        if rgb:
            self.rgb = _dense(in_dim, 3, init)

    def _skip_after(self, i):
        return self.skip_layer > 0 and i % self.skip_layer == 0 and i > 0

    def forward(self, x, cond=None):
        """x: `[..., S, x_dim]`; cond: `[..., cond_dim]` per ray.

        Returns raw_rgb `[..., S, 3]` (None without an rgb head), raw_density `[..., S]`.

        The concatenations of the official MLP are computed as sums of GEMMs
        over slices of the same weights (W [a; b] = W_a a + W_b b): the same
        function and parameters, without copying the skip input, and the
        view-direction term is computed once per ray instead of per sample.
        """
        inputs = x
        skip = False
        for i, layer in enumerate(self.trunk):
            x = F.relu(_linear_of_concat(x, inputs, layer) if skip else layer(x), inplace=True)
            skip = self._skip_after(i)
        if skip:  # a skip after the last trunk layer feeds the heads
            x = torch.cat([x, inputs], dim=-1)
        raw_density = self.density(x)[..., 0]
        if not self.has_rgb:
            return None, raw_density
        if self.use_viewdirs:
            bottleneck = self.bottleneck(x)
            first, *rest = self.condition
            w = first.weight
            per_ray = F.linear(cond, w[:, bottleneck.shape[-1] :], first.bias)
            x = F.relu(F.linear(bottleneck, w[:, : bottleneck.shape[-1]]) + per_ray[..., None, :], inplace=True)
            for layer in rest:
                x = F.relu(layer(x), inplace=True)
        return self.rgb(x), raw_density


class Renderer(nn.Module):
    """What every model here shares: rendering whole images in chunks, the MLP's output activations
    and surface normals. A subclass's `forward(rays, normals)` returns its levels' (rgb, distance,
    acc[, normals]), the last one finest; its `args` hold density_noise, density_bias, rgb_padding."""

    def fused(self, mlp, inputs):
        """Whether `mlp` runs as `fused_mlp`'s kernels on these inputs: bf16, no gradient wanted for the
        inputs (the normals want one), and `fused_mlp.usable` on their device."""
        return self.bf16 and not inputs.requires_grad and fused_mlp.usable(mlp, inputs.device)

    def activate(self, mlp, x, cond, randomized):
        """Colour `[..., S, 3]` (None for an MLP without a colour head) and density `[..., S]` of
        features x `[..., S, C]`: the MLP (under bfloat16 autocast with `self.bf16`, as `fused_mlp`'s
        kernels where `self.fused`; its outputs float32), density noise in randomized training,
        softplus(raw + density_bias), and a sigmoid widened by rgb_padding, as the official releases."""
        a = self.args
        if self.fused(mlp, x):
            raw_rgb, raw_density = fused_mlp.forward(mlp, x, cond)  # the same function in one kernel each way
        else:
            with torch.autocast(x.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
                raw_rgb, raw_density = mlp(x, cond)
        raw_density = raw_density.float()
        if randomized and a.density_noise > 0:
            raw_density = raw_density + a.density_noise * torch.randn_like(raw_density)
        density = F.softplus(raw_density + a.density_bias)
        if raw_rgb is None:
            return None, density
        return torch.sigmoid(raw_rgb.float()) * (1 + 2 * a.rgb_padding) - a.rgb_padding, density

    @staticmethod
    def with_normals(query, mean, *args):
        """`query(mean, *args)` -> (rgb, density `[..., S]`) with the surface normals of the density.

        Returns rgb, density (detached) and normals `[..., S, 3]`: the normalized negative
        gradient of the density with respect to the Gaussians' means `[..., S, 3]`.
        """
        with torch.enable_grad():
            mean = mean.detach().requires_grad_(True)
            rgb, density = query(mean, *args)
            (grad,) = torch.autograd.grad(density.sum(), mean)
        return rgb, density.detach(), -grad / torch.linalg.norm(grad, dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def render_image(self, rays, chunk=8192, normals=False):
        """Render the fine level of a whole image, deterministically, in chunks.

        Args:
          rays: `Rays` of `[H, W, C]` tensors (any device: moved to the model's
            device at once, so that no chunk waits on a copy from the host).
          normals: also render composited normals (see `forward`).

        Returns:
          rgb `[H, W, 3]`, distance `[H, W]`, acc `[H, W]` (and normals
          `[H, W, 3]`) on the model's device.
        """
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            shape = rays.origins.shape[:-1]
            flat = ray_utils.namedtuple_map(lambda r: r.reshape(-1, r.shape[-1]).to(device), rays)
            outs = []
            for i in range(0, flat.origins.shape[0], chunk):
                part = slice(i, i + chunk)
                outs.append(self(ray_utils.namedtuple_map(lambda r, part=part: r[part], flat), normals=normals)[-1])
            return tuple(torch.cat(o, 0).reshape(shape + o[0].shape[1:]) for o in zip(*outs))
        finally:
            self.train(was_training)


def _ray_ops():
    """The ray functions a MipNeRF level runs around its MLP, as ray_utils has them now."""
    return types.SimpleNamespace(
        sample=ray_utils.sample_along_rays,
        resample=ray_utils.resample_along_rays,
        composite=ray_utils.volumetric_rendering,
    )


class MipNeRF(Renderer):
    """mip-NeRF: cone tracing with IPE features and hierarchical sampling.

    Sampling is randomized (stratified jitter, density noise) only in
    training mode and only if `randomized`; `model.eval()` renders
    deterministically.
    """

    def __init__(self, args, randomized=True):
        """args: a `config.ModelArgs`; randomized: jitter and density noise in training mode."""
        super().__init__()
        self.args = args
        self.randomized = randomized
        self.bf16 = False  # the MLP under bfloat16 autocast (runs.set_precision); the rest stays float32
        a = self.args
        x_dim = 2 * 3 * (a.max_deg_point - a.min_deg_point)
        cond_dim = 3 + 2 * 3 * a.deg_view if a.use_viewdirs else 0
        self.mlp = MLP(
            x_dim, cond_dim, a.net_depth, a.net_width, a.skip_layer, a.net_depth_condition, a.net_width_condition
        )
        self.ray_ops = None  # None: ray_utils' functions, looked up at each call; `compile_rays` sets compiled ones

    def compile_rays(self):
        """torch.compile the sampling, resampling and compositing of every level (runs.set_precision
        with `compile`): a few fused kernels each instead of dozens of small ones, and as many fewer
        launches for the host."""
        ops = vars(_ray_ops())
        self.ray_ops = types.SimpleNamespace(**{k: torch.compile(f, dynamic=False) for k, f in ops.items()})

    def forward(self, rays, normals=False):
        """Render a batch of rays through every level.

        Args:
          rays: `ray_utils.Rays` with leading shape `[...]`.
          normals: also return, for the last level, the surface normal
            composited with the rendering weights: the normalized negative
            gradient of the density with respect to the Gaussians' means.

        Returns:
          [(rgb `[..., 3]`, distance `[...]`, acc `[...]`) per level], coarse
          first; with `normals` the last tuple ends with normals `[..., 3]`.
        """
        return list(self.levels(rays, normals))

    def levels(self, rays, normals=False):
        """`forward` one level at a time: yields each level's tuple, coarse first.

        With `stop_level_grad` a level's loss can be backpropagated before the
        next level runs (train.py does), so that only one level's activations
        are held at a time; the gradient is the same sum.
        """
        a = self.args
        randomized = self.randomized and self.training
        view_enc = ray_utils.pos_enc(rays.viewdirs, 0, a.deg_view, True) if a.use_viewdirs else None
        weights = None  # the previous level's, for resampling
        ops = self.ray_ops or _ray_ops()
        for level in range(a.num_levels):
            if level == 0:
                t_vals, (mean, cov) = ops.sample(
                    rays.origins,
                    rays.directions,
                    rays.radii,
                    a.num_samples,
                    rays.near,
                    rays.far,
                    randomized,
                    a.lindisp,
                    a.ray_shape,
                )
            else:
                t_vals, (mean, cov) = ops.resample(
                    rays.origins,
                    rays.directions,
                    rays.radii,
                    t_vals,
                    weights,
                    randomized,
                    a.ray_shape,
                    a.resample_padding,
                    a.stop_level_grad,
                )
            want_normals = normals and level == a.num_levels - 1
            if want_normals:
                rgb, density, n = self.with_normals(self.query, mean, cov, view_enc, randomized)
            else:
                rgb, density = self.query(mean, cov, view_enc, randomized)
            comp_rgb, distance, acc, weights = ops.composite(rgb, density, t_vals, rays.directions, a.white_bkgd)
            out = (comp_rgb, distance, acc)
            if want_normals:
                out = out + ((weights[..., None] * n).sum(-2),)
            yield out

    def features(self, mean, cov):
        """The MLP's input `[..., S, 96]` for Gaussians (mean, cov_diag `[..., S, 3]`): their integrated
        positional encoding (bf16 from one kernel where `self.fused`)."""
        a = self.args
        if a.disable_integration:
            cov = torch.zeros_like(cov)
        ipe = fused_mlp.integrated_pos_enc if self.fused(self.mlp, mean) else ray_utils.integrated_pos_enc
        return ipe(mean, cov, a.min_deg_point, a.max_deg_point)

    def query(self, mean, cov, view_enc, randomized=False):
        """Colour `[..., S, 3]` and density `[..., S]` of Gaussians (mean, cov_diag `[..., S, 3]`)."""
        return self.activate(self.mlp, self.features(mean, cov), view_enc, randomized)
