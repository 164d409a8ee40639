"""The default mip-NeRF MLP as one fused kernel on Hopper GPUs (host side; the kernel is in `fused_kernels.py`).

`model.MLP`'s default shape (8 x 256 trunk, the input fed again into layer 5, a 256 bottleneck, one
128-wide view layer) is evaluated by one persistent Gluon kernel that keeps each 128-row tile's
activations in shared memory and streams the weights through it, instead of one GEMM per layer with
the activations going through GPU memory in between. Semantics: `MLP.forward` under bfloat16
autocast (bf16 operands, float32 accumulation, each layer's output rounded to bf16), the outputs
returned as float32.

This module needs no GPU and no Triton: `problem` says in one line why the kernel cannot run on a
device (and the caller then runs the plain MLP); `pack` and `emulate` are plain PyTorch, so that the
weight packing and the chunk schedule are tested on any machine.
"""

import functools
import weakref

import torch
import torch.nn.functional as F

BM = 128  # rows per tile
WIDTH = 256  # trunk width (the wgmma N of the trunk and the bottleneck)
KC = 64  # K per weight chunk: 64 bf16 = 128 B, one row of the 128-byte swizzle
XK = 128  # the input x (at most 128 wide) as two K chunks, zero-filled past its width
VIEW = 128  # view-layer width (the wgmma N of the view layer)
STAGES = 4  # weight ring depth: 4 x 32 KB, 229,416 B of shared memory (H100: 2.05 ms per 1M rows, 3 stages 2.30)
NUM_WARPS = 8  # two warpgroups, 64 rows each

# The static chunk schedule of one tile: (first chunk, chunks reading h, chunks reading x, bias row, ReLU).
# L0: x (2) | L1..L4: h (4 each) | L5: h (4) then x (2) | L6, L7: h (4) | bottleneck: h (4); the view
# layer's four chunks (36..39) come from its own weight.
SCHEDULE = (
    ((0, 0, 2, 0, True),)
    + tuple((2 + 4 * (i - 1), 4, 0, i, True) for i in range(1, 5))
    + ((18, 4, 2, 5, True), (24, 4, 0, 6, True), (28, 4, 0, 7, True), (32, 4, 0, 8, False))
)
VIEW_C0 = 36
TOTAL_CHUNKS = 40

# Offsets into the float32 vector of small parameters (each rounded to bf16, as autocast uses them)
P_BIAS = 0  # 9 x 256: trunk biases 0..7, then the bottleneck's
P_WD = 9 * WIDTH  # density weight [256]
P_WRGB = P_WD + WIDTH  # rgb weight [3, 128]
P_BRGB = P_WRGB + 3 * VIEW  # rgb bias [3]
P_BD = P_BRGB + 3  # density bias [1]
P_LEN = P_BD + 1


def supports(mlp):
    """None if `mlp` has the shape the kernel computes, else why not (one phrase)."""
    t = mlp.trunk
    if len(t) != 8 or any(lin.out_features != WIDTH for lin in t):
        return 'the trunk is not 8 x 256'
    if mlp.skip_layer != 4:
        return 'the skip is not into layer 5'
    if t[0].in_features > XK or t[5].in_features != WIDTH + t[0].in_features:
        return f'the input is wider than {XK}'
    if not mlp.use_viewdirs or len(mlp.condition) != 1:
        return 'there is no single view layer'
    if mlp.bottleneck.out_features != WIDTH or mlp.condition[0].out_features != VIEW:
        return f'the bottleneck is not {WIDTH} or the view layer not {VIEW} wide'
    return None


def _bf(t):
    return t.detach().to(torch.bfloat16)


def pack(mlp):
    """The MLP's weights in the kernel's order, bf16.

    Returns a dict: `w` [36 * 256, 64], the K chunks [256 (out), 64 (in)] of the trunk and bottleneck
    weights in schedule order (the x parts zero-padded to 128); `wv_h` [128, 256], the view layer's
    weight on the bottleneck; `wv_c` [128, cond_dim] and `bv` [128], its weight on the per-ray input and
    its bias (applied once per ray, on the host); `params` [P_LEN] float32, the biases and the head
    weights.
    """
    xd = mlp.trunk[0].in_features
    t = [_bf(lin.weight) for lin in mlp.trunk]

    def chunks(w):  # [256, K] -> K / 64 chunks [256, 64]
        return [w[:, k : k + KC] for k in range(0, w.shape[1], KC)]

    def pad_x(w):
        return F.pad(w, (0, XK - xd))

    parts = chunks(pad_x(t[0]))
    for i in range(1, 5):
        parts += chunks(t[i])
    parts += chunks(t[5][:, :WIDTH]) + chunks(pad_x(t[5][:, WIDTH:]))  # layer 5 reads [h, x]
    parts += chunks(t[6]) + chunks(t[7]) + chunks(_bf(mlp.bottleneck.weight))
    wv = mlp.condition[0].weight
    params = torch.cat(
        [lin.bias for lin in mlp.trunk]
        + [mlp.bottleneck.bias, mlp.density.weight[0], mlp.rgb.weight.reshape(-1), mlp.rgb.bias, mlp.density.bias]
    )
    return dict(
        w=torch.cat(parts, 0).contiguous(),
        wv_h=_bf(wv[:, :WIDTH]).contiguous(),
        wv_c=_bf(wv[:, WIDTH:]).contiguous(),
        bv=_bf(mlp.condition[0].bias),
        params=_bf(params).float(),
        x_dim=xd,
    )


def per_ray(pk, cond):
    """The view layer's per-ray term `[R, 128]` bf16 of cond `[..., cond_dim]`, as `MLP.forward` under autocast."""
    return F.linear(cond.reshape(-1, cond.shape[-1]).to(torch.bfloat16), pk['wv_c'], pk['bv']).contiguous()


def _r(t):  # round to bf16, keep float32
    return t.to(torch.bfloat16).float()


def emulate(mlp, x, cond):
    """The kernel's arithmetic in PyTorch (any device): the packed chunks in schedule order with its
    bf16 rounding points. x `[..., S, x_dim]`, cond `[..., cond_dim]` -> (raw_rgb `[..., S, 3]`,
    raw_density `[..., S]`) float32. It checks `pack` and the schedule, not the Gluon code."""
    pk = pack(mlp)
    S, xd = x.shape[-2], x.shape[-1]
    xp = F.pad(_r(x.reshape(-1, xd).float()), (0, XK - xd))  # what the kernel's zero-filled TMA loads
    n = xp.shape[0]
    w = pk['w'].float().view(VIEW_C0, WIDTH, KC)
    prm = pk['params']
    h = torch.zeros(n, WIDTH, device=x.device)
    for c0, nh, nx, row, relu in SCHEDULE:
        acc = sum(
            (h[:, j * KC : (j + 1) * KC] if j < nh else xp[:, (j - nh) * KC : (j - nh + 1) * KC]) @ w[c0 + j].T
            for j in range(nh + nx)
        )
        v = acc + prm[P_BIAS + row * WIDTH : P_BIAS + (row + 1) * WIDTH]
        h = _r(v.clamp_min(0) if relu else v)
        if row == 7:
            density = _r(h @ prm[P_WD : P_WD + WIDTH] + prm[P_BD])
    ray = torch.arange(n, device=x.device) // S
    v = _r(_r(h @ pk['wv_h'].float().T) + per_ray(pk, cond).float()[ray]).clamp_min(0)
    rgb = _r(v @ prm[P_WRGB : P_WRGB + 3 * VIEW].view(3, VIEW).T + prm[P_BRGB : P_BRGB + 3])
    return rgb.view(x.shape[:-1] + (3,)), density.view(x.shape[:-1])


_PACKS = weakref.WeakKeyDictionary()  # mlp -> (parameter versions, packed weights on its device)


def _packed(mlp):
    version = tuple((p.data_ptr(), p._version) for p in mlp.parameters())
    hit = _PACKS.get(mlp)
    if hit is None or hit[0] != version:
        import fused_kernels

        hit = (version, fused_kernels.describe(pack(mlp)))
        _PACKS[mlp] = hit
    return hit[1]


@torch.no_grad()
def forward(mlp, x, cond):
    """(raw_rgb `[..., S, 3]`, raw_density `[..., S]`) float32 of x `[..., S, x_dim]` and cond `[..., cond_dim]`
    on a CUDA device where `problem` is None: `mlp(x, cond)` under bf16 autocast, in one kernel."""
    import fused_kernels

    pk = _packed(mlp)
    S = x.shape[-2]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    rgb, density = fused_kernels.forward(pk, x2, per_ray(pk, cond), S)
    return rgb.view(x.shape[:-1] + (3,)), density.view(x.shape[:-1])


@functools.cache
def _device_problem(device):
    if device.type != 'cuda':
        return f'{device} is not a CUDA device'
    if not torch.cuda.is_available():
        return 'CUDA is not available here'
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f'{torch.cuda.get_device_name(device)} is sm_{major}{minor}; the kernel needs a Hopper GPU (sm_90)'
    try:
        import fused_kernels  # noqa: F401
    except ImportError as e:
        return f'Triton with Gluon (triton>=3.6) cannot be imported: {e}'
    from model import MLP  # a probe of the default shape: compiles the kernel and checks it once

    try:
        gen = torch.Generator(device=device).manual_seed(0)
        mlp = MLP(96, 27, 8, WIDTH, 4).to(device)
        x = torch.randn(3, 100, 96, device=device, generator=gen)
        cond = torch.randn(3, 27, device=device, generator=gen)
        rgb, density = forward(mlp, x, cond)
        ref_rgb, ref_density = emulate(mlp, x, cond)
        err = max((rgb - ref_rgb).abs().max().item(), (density - ref_density).abs().max().item())
    except Exception as e:  # any failure of the tool chain or the launch, reported in one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f'the kernel failed to run: {type(e).__name__}: {lines[0] if lines else "no message"}'[:300]
    if not err < 0.05:
        return f'the kernel disagrees with the plain MLP on this GPU (max error {err:.3g})'
    return None


def problem(device):
    """Why the fused kernel cannot run on `device` (a torch.device), as one line, or None.

    On a Hopper GPU it compiles the kernel and compares it once with `emulate`; the answer is cached
    per device for the process."""
    return _device_problem(torch.device(device))


def usable(mlp, device, log=print):
    """Whether `forward` can stand in for `mlp` on `device`: the shape is supported and `problem` is None.

    The first time a CUDA device cannot run the kernel for a supported shape, `log` gets one line
    saying why and that the plain MLP runs instead."""
    if device.type != 'cuda' or supports(mlp) is not None:
        return False
    why = problem(device)
    if why is not None and device not in _TOLD:
        _TOLD.add(device)
        log(f'fused MLP kernel: {why}; the plain bf16 MLP renders instead')
    return why is None


_TOLD = set()
