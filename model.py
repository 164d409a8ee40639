"""The mip-NeRF model: one MLP shared by the coarse and fine levels.

Architecture and defaults follow the paper and the official release
(google/mipnerf, `internal/models.py`). Every script builds the model through
`MipNeRF.from_config` or `load_checkpoint`, so a checkpoint alone is enough to
rebuild it.
"""
import argparse
import contextlib
import dataclasses
import os
import re

import torch
from torch import nn
import torch.nn.functional as F

import fused_mlp
import ray_utils


@dataclasses.dataclass
class ModelArgs:
    """Everything needed to rebuild the network; saved in every checkpoint."""
    num_samples: int = 128        # samples (intervals) per level
    num_levels: int = 2           # coarse + fine
    resample_padding: float = 0.01
    stop_level_grad: bool = True  # no gradient through the resampling
    use_viewdirs: bool = True
    lindisp: bool = False
    ray_shape: str = 'cone'       # 'cone' or 'cylinder'
    min_deg_point: int = 0
    max_deg_point: int = 16
    deg_view: int = 4
    density_noise: float = 0.     # std of Gaussian noise on raw density (training only)
    density_bias: float = -1.
    rgb_padding: float = 0.001
    disable_integration: bool = False  # PE of the means instead of IPE (ablation)
    white_bkgd: bool = True
    net_depth: int = 8
    net_width: int = 256
    net_depth_condition: int = 1
    net_width_condition: int = 128
    skip_layer: int = 4

    @classmethod
    def from_config(cls, cfg):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(cfg).items() if k in names})


def _dense(in_features, out_features):
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)   # glorot_uniform, as the official release
    nn.init.zeros_(layer.bias)
    return layer


def _linear_of_concat(a, b, layer):
    """layer(cat([a, b], -1)) without the copy: W_a a + W_b b + bias, two GEMMs."""
    w, k = layer.weight, a.shape[-1]
    out = F.linear(b, w[:, k:], layer.bias)
    out = torch.addmm(out.reshape(-1, out.shape[-1]), a.reshape(-1, k), w[:, :k].t())
    return out.view(a.shape[:-1] + (w.shape[0],))


class MLP(nn.Module):
    """The NeRF MLP: an 8x256 trunk, density head, bottleneck and view branch.

    The encoded input is concatenated to the output of trunk layer
    `skip_layer` (0-based, so the fifth layer with the default 4), which feeds
    the sixth layer, exactly as `i % skip_layer == 0 and i > 0` in the
    official release.
    """

    def __init__(self, x_dim, cond_dim, a: ModelArgs):
        super().__init__()
        self.skip_layer = a.skip_layer
        self.x_dim, self.net_width, self.net_width_condition = x_dim, a.net_width, a.net_width_condition
        layers, in_dim = [], x_dim
        for i in range(a.net_depth):
            layers.append(_dense(in_dim, a.net_width))
            in_dim = a.net_width + (x_dim if self._skip_after(i) else 0)
        self.trunk = nn.ModuleList(layers)
        self.density = _dense(in_dim, 1)
        self.use_viewdirs = cond_dim > 0
        if self.use_viewdirs:
            self.bottleneck = _dense(in_dim, a.net_width)
            cond, c_in = [], a.net_width + cond_dim
            for _ in range(a.net_depth_condition):
                cond.append(_dense(c_in, a.net_width_condition))
                c_in = a.net_width_condition
            self.condition = nn.ModuleList(cond)
            in_dim = c_in
        self.rgb = _dense(in_dim, 3)

    def _skip_after(self, i):
        return self.skip_layer > 0 and i % self.skip_layer == 0 and i > 0

    def forward(self, x, cond=None):
        """x: `[..., S, x_dim]`; cond: `[..., cond_dim]` per ray.

        Returns raw_rgb `[..., S, 3]`, raw_density `[..., S]`.

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
        if self.use_viewdirs:
            bottleneck = self.bottleneck(x)
            first, *rest = self.condition
            w = first.weight
            per_ray = F.linear(cond, w[:, bottleneck.shape[-1]:], first.bias)
            x = F.relu(F.linear(bottleneck, w[:, :bottleneck.shape[-1]]) + per_ray[..., None, :], inplace=True)
            for layer in rest:
                x = F.relu(layer(x), inplace=True)
        return self.rgb(x), raw_density


class MipNeRF(nn.Module):
    """mip-NeRF: cone tracing with IPE features and hierarchical sampling.

    Sampling is randomized (stratified jitter, density noise) only in
    training mode and only if `randomized`; `model.eval()` renders
    deterministically.
    """

    def __init__(self, args: ModelArgs = None, randomized: bool = True, **kwargs):
        super().__init__()
        self.args = args if args is not None else ModelArgs(**kwargs)
        self.randomized = randomized
        # Run the MLP under bfloat16 autocast; sampling, IPE and compositing stay float32.
        self.bf16 = False
        self.kernels = 'torch'  # or 'triton': the fused MLP kernels (bf16 on CUDA), fused_mlp.py
        self._packed = None     # (parameter versions, fused_mlp.Packed)
        a = self.args
        x_dim = 2 * 3 * (a.max_deg_point - a.min_deg_point)
        cond_dim = 3 + 2 * 3 * a.deg_view if a.use_viewdirs else 0
        self.mlp = MLP(x_dim, cond_dim, a)

    @classmethod
    def from_config(cls, cfg):
        model = cls(ModelArgs.from_config(cfg), randomized=cfg.randomized)
        model.set_precision(getattr(cfg, 'precision', 'fp32'))
        model.kernels = getattr(cfg, 'kernels', 'torch')
        return model

    def set_precision(self, precision):
        """'fp32' (exact float32 matrix products), 'tf32' (TensorFloat-32 matrix
        products on CUDA) or 'bf16' (the MLP under bfloat16 autocast)."""
        if precision not in ('fp32', 'tf32', 'bf16'):
            raise ValueError(f'precision must be fp32, tf32 or bf16, got {precision!r}')
        self.bf16 = precision == 'bf16'
        torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
        torch.backends.cudnn.allow_tf32 = precision == 'tf32'
        return self

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
        weights = None   # the previous level's, for resampling
        for level in range(a.num_levels):
            if level == 0:
                t_vals, (mean, cov) = ray_utils.sample_along_rays(
                    rays.origins, rays.directions, rays.radii, a.num_samples,
                    rays.near, rays.far, randomized, a.lindisp, a.ray_shape)
            else:
                t_vals, (mean, cov) = ray_utils.resample_along_rays(
                    rays.origins, rays.directions, rays.radii, t_vals, weights,
                    randomized, a.ray_shape, a.resample_padding, a.stop_level_grad)
            want_normals = normals and level == a.num_levels - 1
            with torch.enable_grad() if want_normals else contextlib.nullcontext():
                if want_normals:
                    mean = mean.detach().requires_grad_(True)
                rgb, density = self.query(mean, cov, view_enc, randomized)
                if want_normals:
                    grad, = torch.autograd.grad(density.sum(), mean)
            comp_rgb, distance, acc, weights = ray_utils.volumetric_rendering(
                rgb, density.detach() if want_normals else density, t_vals, rays.directions, a.white_bkgd)
            out = (comp_rgb, distance, acc)
            if want_normals:
                n = -grad / torch.linalg.norm(grad, dim=-1, keepdim=True).clamp_min(1e-12)
                out = out + ((weights[..., None] * n).sum(-2),)
            yield out

    def query(self, mean, cov, view_enc, randomized=False):
        """Colour `[..., S, 3]` and density `[..., S]` of Gaussians (mean, cov_diag `[..., S, 3]`)."""
        a = self.args
        if a.disable_integration:
            cov = torch.zeros_like(cov)
        x = ray_utils.integrated_pos_enc(mean, cov, a.min_deg_point, a.max_deg_point)
        if self.use_fused(x):
            raw_rgb, raw_density = fused_mlp.fused_forward(self.mlp, self.packed_weights(), x, view_enc)
        elif self.bf16:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                raw_rgb, raw_density = self.mlp(x, view_enc)
            raw_rgb, raw_density = raw_rgb.float(), raw_density.float()
        else:
            raw_rgb, raw_density = self.mlp(x, view_enc)
        if randomized and a.density_noise > 0:
            raw_density = raw_density + a.density_noise * torch.randn_like(raw_density)
        rgb = torch.sigmoid(raw_rgb) * (1 + 2 * a.rgb_padding) - a.rgb_padding
        return rgb, F.softplus(raw_density + a.density_bias)

    def fused_reason(self, device):
        """None if the fused Triton MLP runs for inputs on `device`, else why not."""
        if self.kernels != 'triton':
            return '--kernels torch'
        if not self.bf16:
            return 'the fused kernels run in bf16 only (--precision bf16)'
        if not fused_mlp.available():
            return 'Triton is not installed'
        if torch.device(device).type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
            return 'the fused kernels need CUDA'
        return fused_mlp.supported(self.mlp)

    def use_fused(self, x):
        # Inputs that need a gradient (normals) take the plain path: the kernels have no input gradient.
        return not x.requires_grad and self.fused_reason(x.device) is None

    def watch_optimizer(self, optimizer):
        """Rebuild the fused kernels' weights after each step of `optimizer` (fused Adam
        updates parameters without bumping their version counters)."""
        def forget(*_):
            self._packed = None
        optimizer.register_step_post_hook(forget)
        return optimizer

    def packed_weights(self):
        """The MLP's weights in the kernels' layout, rebuilt when a parameter changed."""
        key = tuple((p.data_ptr(), p._version) for p in self.mlp.parameters())
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, fused_mlp.Packed(self.mlp))
        return self._packed[1]

    @torch.no_grad()
    def render_image(self, rays, chunk=8192, normals=False):
        """Render the fine level of a whole image, deterministically, in chunks.

        Args:
          rays: `Rays` of `[H, W, C]` tensors (any device: chunks are moved to
            the model's device).
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
            flat = ray_utils.namedtuple_map(lambda r: r.reshape(-1, r.shape[-1]), rays)
            outs = []
            for i in range(0, flat.origins.shape[0], chunk):
                chunk_rays = ray_utils.namedtuple_map(lambda r: r[i:i + chunk].to(device), flat)
                outs.append(self(chunk_rays, normals=normals)[-1])
            return tuple(torch.cat(o, 0).reshape(shape + o[0].shape[1:]) for o in zip(*outs))
        finally:
            self.train(was_training)


def list_checkpoints(log_dir):
    """Checkpoints `ckpt_<step>.pt` in log_dir, oldest first."""
    if not os.path.isdir(log_dir):
        return []
    names = [n for n in os.listdir(log_dir) if re.fullmatch(r'ckpt_\d+\.pt', n)]
    return [os.path.join(log_dir, n) for n in sorted(names)]


CHECKPOINT_KEYS = ('step', 'model_args', 'config', 'model')


def read_checkpoint(path, device='cpu', keys=CHECKPOINT_KEYS):
    """torch.load a checkpoint written by train.py, with its 'path' added; ValueError with a one-line
    reason otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, empty, not a checkpoint, ...
        reason = str(e).splitlines()[0][:80] if str(e) else ''
        raise ValueError(f'checkpoint {path} is unreadable ({type(e).__name__}{": " + reason if reason else ""})') from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f'{path} is not a checkpoint of train.py (no {", ".join(missing)})')
    ckpt['path'] = path
    return ckpt


def load_checkpoint(path, device='cpu'):
    """Rebuild the model from a checkpoint written by train.py.

    Returns (model in eval mode on `device`, checkpoint dict with its 'path').
    """
    ckpt = read_checkpoint(path, device)
    try:
        model = MipNeRF(ModelArgs(**ckpt['model_args']), randomized=False)
        model.load_state_dict(ckpt['model'])
    except (TypeError, RuntimeError) as e:
        raise ValueError(f'checkpoint {path} does not match this code\'s network '
                         f'({type(e).__name__}: {str(e).splitlines()[0][:80]})') from None
    return model.to(device).eval(), ckpt


def load_run(path, device='cpu'):
    """A trained run from its folder (latest readable checkpoint) or a checkpoint file.

    Returns (model in eval mode, the run's config as a Namespace, checkpoint
    dict). In a folder, an unreadable latest checkpoint (a crash mid-copy, a
    full disk) is skipped with a note, as `train.py --resume` does.
    """
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f'no checkpoint (ckpt_*.pt) in {path}: train first, or pass a checkpoint file')
        for i, candidate in enumerate(reversed(found)):
            try:
                model, ckpt = load_checkpoint(candidate, device)
                break
            except ValueError as e:
                if i == len(found) - 1:
                    raise ValueError(f'{e}; no readable checkpoint in {path}') from None
                print(f'{e}; taking the one before')
    elif not os.path.exists(path):
        raise FileNotFoundError(f'{path} does not exist: pass a run folder (--log_dir) or a checkpoint file (--ckpt)')
    else:
        model, ckpt = load_checkpoint(path, device)
    return model, argparse.Namespace(**ckpt['config']), ckpt


def open_run(args, split=None):
    """What a script needs from a trained run, given `config.run_parser` flags.

    Joins the torchrun process group if there is one, rebuilds the model and
    config from the checkpoint and, with `split`, loads that split of the
    scene (from --base_dir if given). Returns (model, cfg, ckpt, device,
    data); raises FileNotFoundError or ValueError with a one-line message.
    """
    import config as config_lib
    import datasets
    import ddp
    if not args.log_dir and not args.ckpt:
        raise ValueError('pass the run with --log_dir RUN_FOLDER (or a checkpoint with --ckpt FILE)')
    if not args.log_dir:
        args.log_dir = os.path.dirname(os.path.abspath(args.ckpt))
    config_lib.validate_device(args.device)
    device = ddp.setup(config_lib.resolve_device(args.device))
    model, cfg, ckpt = load_run(args.ckpt or args.log_dir, device)
    model.set_precision(getattr(args, 'precision', None) or getattr(cfg, 'precision', 'fp32'))
    model.kernels = getattr(args, 'kernels', None) or getattr(cfg, 'kernels', 'torch')
    if model.kernels == 'triton' and model.fused_reason(device):
        raise ValueError(f'--kernels triton: {model.fused_reason(device)}; --kernels torch runs anywhere')
    if getattr(args, 'base_dir', None):
        cfg.base_dir = args.base_dir
    data = datasets.dataset_from_config(cfg, split) if split else None
    return model, cfg, ckpt, device, data
