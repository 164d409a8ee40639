"""The default mip-NeRF MLP as fused kernels on Hopper GPUs (host side; the kernels are in `fused_kernels.py`).

`model.MLP`'s default shape (8 x 256 trunk, the input fed again into layer 5, a 256 bottleneck, one
128-wide view layer) runs as one persistent Gluon kernel per pass: each 128-row tile's activations
stay in shared memory while the weights stream through, instead of one GEMM per layer with the
activations going through GPU memory in between. Training saves the activations (bf16) for a
backward kernel that gives every layer's pre-activation gradient; the weight gradients are then
large GEMMs (`weight_grads`; on the GPU four launches of one kernel, each with its bias sums).
Semantics: `MLP.forward` and its gradients under bfloat16 autocast (bf16 operands and activations,
float32 accumulation and parameter gradients), outputs float32.
No gradient flows to the inputs x and cond (they come from data).

This module needs no GPU and no Triton: `problem` says in one line why the kernels cannot run on a
device (the caller then runs the plain MLP); `pack`, `emulate` and `weight_grads` are plain
PyTorch, so that the packing, both chunk schedules and the gradient GEMMs are tested anywhere.
"""

import functools
import weakref

import torch
import torch.nn.functional as F

import cli

BM = 128  # rows per tile
WIDTH = 256  # trunk width (the wgmma N of the trunk and the bottleneck)
KC = 64  # K per weight chunk: 64 bf16 = 128 B, one row of the 128-byte swizzle
XK = 128  # the input x (at most 128 wide) as two K chunks, zero-filled past its width
VIEW = 128  # view-layer width
NUM_WARPS = 8  # two warpgroups, 64 rows each
NSAVE = 9  # activations saved for the backward: h_0..h_7 and the bottleneck

# Forward chunk schedule of one tile: (first chunk, chunks reading h, chunks reading x, bias row, ReLU).
# L0: x (2) | L1..L4: h (4 each) | L5: h (4) then x (2) | L6, L7: h (4) | bottleneck: h (4); then the
# view layer's 4 chunks (36..39) from its own weight.
FWD_SCHEDULE = (
    ((0, 0, 2, 0, True),)
    + tuple((2 + 4 * (i - 1), 4, 0, i, True) for i in range(1, 5))
    + ((18, 4, 2, 5, True), (24, 4, 0, 6, True), (28, 4, 0, 7, True), (32, 4, 0, 8, False))
)
VIEW_C0, FWD_TOTAL = 36, 40
# Backward, over chunks of the transposed weights: 2 (view, K = 128) then, per product, (first chunk,
# DZ block written, H block masking it): the bottleneck's gives dz_7, then W_7 .. W_1 give dz_6 .. dz_0.
BWD_SCHEDULE = ((2, 7, 7),) + tuple((6 + 4 * k, 6 - k, 6 - k) for k in range(7))
BWD_TOTAL = 34

# Offsets into the float32 vector of small parameters (each rounded to bf16, as autocast uses them)
P_BIAS = 0  # 9 x 256: trunk biases 0..7, then the bottleneck's
P_WD = 9 * WIDTH  # density weight [256]
P_WRGB = P_WD + WIDTH  # rgb weight [3, 128]
P_BRGB = P_WRGB + 3 * VIEW  # rgb bias [3]
P_BD = P_BRGB + 3  # density bias [1]

# torch weight-gradient GEMMs over 524,288 rows: 16 pieces summed in fp32 (H100: 1.67 ms against 2.88 in one)
SPLIT_K = 16
PARAMS = tuple(f'trunk.{i}.{k}' for i in range(8) for k in ('weight', 'bias')) + (
    'density.weight',
    'density.bias',
    'bottleneck.weight',
    'bottleneck.bias',
    'condition.0.weight',
    'condition.0.bias',
    'rgb.weight',
    'rgb.bias',
)


def supports(mlp):
    """None if `mlp` has the shape the kernels compute, else why not (one phrase)."""
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
    if tuple(name for name, _ in mlp.named_parameters()) != PARAMS:
        return 'its parameters are not those of model.MLP'
    return None


def _bf(t):
    return t.detach().to(torch.bfloat16)


def _chunks(w):
    """[256, 64 n] -> [n * 256, 64]: chunk c, w[:, 64c : 64c + 64], at rows 256c."""
    n = w.shape[1] // KC
    return w.reshape(WIDTH, n, KC).transpose(0, 1).reshape(n * WIDTH, KC)


def pack(params, cast=_bf):
    """Both kernels' weights from the parameters (in `PARAMS` order), each through `cast` (bf16).

    Returns a dict: `w` [36 * 256, 64], the forward's K chunks [256 (out), 64 (in)] of the trunk and
    bottleneck weights in schedule order (x parts zero-padded to 128 wide); `wt` [34 * 256, 64], the
    backward's chunks of the transposed weights; `wv_h` [128, 256], the view layer's weight on the
    bottleneck; `wv_c` [128, cond_dim] and `bv` [128], its weight on the per-ray input and its bias
    (applied once per ray, on the host); `params` the biases and head weights (as float32).
    """
    tw, tb = params[0:16:2], params[1:16:2]
    wd, bd, wb, bb, wv, bv, wrgb, brgb = params[16:]
    W = [cast(w) for w in tw]
    Wb, wv_h = cast(wb), cast(wv[:, :WIDTH])
    xd = W[0].shape[1]

    def pad_x(w):
        return F.pad(w, (0, XK - xd))

    fwd = [pad_x(W[0]), *W[1:5], W[5][:, :WIDTH], pad_x(W[5][:, WIDTH:]), W[6], W[7], Wb]  # layer 5 reads [h, x]
    bwd = [wv_h.t(), Wb.t(), W[7].t(), W[6].t(), W[5][:, :WIDTH].t(), W[4].t(), W[3].t(), W[2].t(), W[1].t()]
    small = [cast(b) for b in tb] + [cast(bb), cast(wd[0]), cast(wrgb).reshape(-1), cast(brgb), cast(bd)]
    return dict(
        w=_chunks(torch.cat(fwd, 1)),
        wt=_chunks(torch.cat(bwd, 1)),
        wv_h=wv_h.contiguous(),
        wv_c=cast(wv[:, WIDTH:]).contiguous(),
        bv=cast(bv),
        params=torch.cat(small).float(),
    )


class _Packer:
    """Packs an MLP's weights into the same buffers at every call (so that the TMA descriptors, made
    once, stay valid): each packed tensor is one gather from the flattened parameters, through
    indices found by running `pack` once on the parameters' positions."""

    def __init__(self, params):
        starts = torch.tensor([0] + [p.numel() for p in params]).cumsum(0).tolist()
        # positions + 1 (0 stands for pack's zero padding), exact in float64
        where = [
            torch.arange(s + 1, s + 1 + p.numel(), dtype=torch.float64).view(p.shape) for s, p in zip(starts, params)
        ]
        idx = pack(where, cast=lambda t: t)
        dev = params[0].device
        self.idx = {k: v.reshape(-1).long().to(dev) for k, v in idx.items()}
        self.bufs = {
            k: torch.empty(v.shape, device=dev, dtype=v.dtype if k == 'params' else torch.bfloat16)
            for k, v in idx.items()
        }
        self.pk = None

    @torch.no_grad()
    def fill(self, params):
        """`pack(params)`, written into the buffers; returns them."""
        flat = torch.cat([params[0].new_zeros(1)] + [p.reshape(-1) for p in params]).to(torch.bfloat16)
        for k, i in self.idx.items():
            if k == 'params':
                self.bufs[k].copy_(flat[i])
            else:
                torch.index_select(flat, 0, i, out=self.bufs[k].view(-1))
        return self.bufs

    def __call__(self, params):
        # Repacked at every call (one concatenation and four gathers, 1.2 MB): version counters cannot
        # tell when to, since the fused Adam step updates the parameters in place without bumping them.
        self.fill(params)
        if self.pk is None:
            import fused_kernels

            self.pk = fused_kernels.describe(self.bufs)
        return self.pk


_PACKERS = weakref.WeakKeyDictionary()  # mlp -> its _Packer


def _packed(mlp, params):
    packer = _PACKERS.get(mlp)
    if packer is None:
        packer = _PACKERS[mlp] = _Packer(params)
    return packer(params)


def per_ray(pk, cond):
    """The view layer's per-ray term `[R, 128]` bf16 of cond `[..., cond_dim]`, as `MLP.forward` under autocast."""
    return F.linear(cond.reshape(-1, cond.shape[-1]).to(torch.bfloat16), pk['wv_c'], pk['bv']).contiguous()


def _pieces(rows, split=SPLIT_K):
    """How many pieces a weight-gradient GEMM cuts its `rows` into: `split` where they divide evenly into
    pieces of at least 4,096 rows, else 1."""
    return split if split > 1 and rows % split == 0 and rows >= split * 4096 else 1


def _tn(a, b, split=SPLIT_K):
    """a^T @ b for a `[rows, M]`, b `[rows, K]` bf16 -> float32 `[M, K]`; the long rows in `_pieces` (one
    batched GEMM, summed in float32)."""
    p = _pieces(a.shape[0], split)
    if p > 1:
        r = a.shape[0] // p
        return torch.bmm(a.view(p, r, -1).transpose(1, 2), b.view(p, r, -1)).sum(0, dtype=torch.float32)
    return (a.t() @ b).float()


def tn_sums(A, B, a_rows, b_rows, rows):
    """Transposed products with column sums (the weight and bias gradients), in plain torch: for job j,
    a = A[a_rows[j] : a_rows[j] + rows] `[rows, M]` and b = B[b_rows[j] : b_rows[j] + rows] `[rows, K]`
    (bf16; rows past the end of A or B count as zero) -> dW `[jobs, M, K]` float32 with dW[j] = a^T @ b
    (`_tn`: bf16 products, float32 sums) and db `[jobs, M]` float32 with db[j] = a.sum(0). On the GPU
    `fused_kernels.tn_sums` does each call in one kernel, reading each a once."""
    dW, db = [], []
    for i, j in zip(a_rows, b_rows):
        a, b = (F.pad(T[k : k + rows], (0, 0, 0, rows - T[k : k + rows].shape[0])) for T, k in ((A, i), (B, j)))
        dW.append(_tn(a, b))
        db.append(a.sum(0, dtype=torch.float32))
    return torch.stack(dW), torch.stack(db)


def weight_grads(params, H, V, DZ, DV, x, cond, d_rgb, d_density, samples, tn=tn_sums):
    """Every parameter's gradient (float32, in `PARAMS` order) from the saved activations and the
    backward kernel's pre-activation gradients.

    H, DZ `[9 * Npad, 256]` and V, DV `[Npad, 128]` bf16 (rows n.. of DZ and DV zero); x `[n, x_dim]`
    and cond `[R, cond_dim]` bf16 (n = R x samples); d_rgb `[n, 3]`, d_density `[n]` float32. The
    weights' gradients are dz^T @ input GEMMs with bf16 operands, as autocast's; the biases' are
    float32 column sums; both from `tn` (`tn_sums`'s contract) in four calls.
    """
    n = x.shape[0]
    npad = V.shape[0]
    H3 = H.view(NSAVE, npad, WIDTH)
    # blocks 1..8 (layers 1..7, the bottleneck): dz_l^T @ h_{l-1}, dz_l's sums
    dW, db = tn(DZ, H, [(i + 1) * npad for i in range(8)], [i * npad for i in range(8)], npad)
    dWx, dbx = tn(DZ, x, (0, 5 * npad), (0, 0), npad)  # layers 0 and 5 on x: dz_0^T @ x, dz_5^T @ x
    dWv, dbv = tn(DV, H, (0,), (8 * npad,), npad)  # the view layer on the bottleneck: dv^T @ h_8, dv's sums
    d_rgb_b, d_density_b = d_rgb.to(torch.bfloat16), d_density.to(torch.bfloat16)
    dWrgb, _ = tn(F.pad(d_rgb_b, (0, 13)), V, (0,), (0,), npad)  # the rgb layer: d_rgb^T @ v (16 wide for TMA)
    d_ray = DV[:n].view(-1, samples, VIEW).sum(1, dtype=torch.float32)  # the per-ray term's gradient
    grads = [dWx[0], dbx[0]]
    for i in range(1, 8):
        w = torch.cat([dW[i - 1], dWx[1]], 1) if i == 5 else dW[i - 1]
        grads += [w, db[i - 1]]
    grads += [
        (d_density_b[None] @ H3[7, :n]).float(),
        d_density.sum().reshape(1),
        dW[7],
        db[7],
        torch.cat([dWv[0], (d_ray.to(torch.bfloat16).t() @ cond).float()], 1),
        dbv[0],
        dWrgb[0, :3],
        d_rgb.sum(0),
    ]
    return [g.to(q.dtype).reshape(q.shape) for g, q in zip(grads, params)]


class _FusedMLP(torch.autograd.Function):
    """The MLP's raw outputs by the forward kernel, saving its activations; the gradient of every
    parameter by the backward kernel and `weight_grads` (none for x or cond)."""

    @staticmethod
    def forward(ctx, mlp, x, cond, *params):
        import fused_kernels

        pk = _packed(mlp, params)
        S = x.shape[-2]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        cond2 = cond.reshape(-1, cond.shape[-1]).to(torch.bfloat16).contiguous()
        rgb, density, H, V = fused_kernels.forward(pk, x2, per_ray(pk, cond2), S, save=True)
        ctx.saved = (pk, x2, cond2, H, V, S)
        ctx.save_for_backward(*params)
        return rgb.view(x.shape[:-1] + (3,)), density.view(x.shape[:-1])

    @staticmethod
    def backward(ctx, g_rgb, g_density):
        import fused_kernels

        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError('fused_mlp: no gradient for x or cond; the caller runs the plain MLP for those')
        pk, x2, cond2, H, V, S = ctx.saved
        ctx.saved = None
        n = x2.shape[0]
        d_rgb = (g_rgb if g_rgb is not None else x2.new_zeros(n, 3)).reshape(n, 3).float().contiguous()
        d_density = (g_density if g_density is not None else x2.new_zeros(n)).reshape(n).float().contiguous()
        DZ, DV = fused_kernels.backward(pk, H, V, d_rgb, d_density, n)
        grads = weight_grads(ctx.saved_tensors, H, V, DZ, DV, x2, cond2, d_rgb, d_density, S, tn=fused_kernels.tn_sums)
        return (None, None, None) + tuple(grads)


def forward(mlp, x, cond):
    """(raw_rgb `[..., S, 3]`, raw_density `[..., S]`) float32 of x `[..., S, x_dim]` (S >= 1, no gradient
    wanted) and cond `[..., cond_dim]` on a CUDA device where `problem` is None: `mlp(x, cond)` under
    bf16 autocast, in one kernel; differentiable in the parameters where gradients are enabled."""
    import fused_kernels

    params = tuple(mlp.parameters())
    if x.numel() == 0:
        return x.new_zeros(x.shape[:-1] + (3,)), x.new_zeros(x.shape[:-1])
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _FusedMLP.apply(mlp, x, cond, *params)
    with torch.no_grad():
        pk = _packed(mlp, params)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # (no copy for `integrated_pos_enc`'s)
        rgb, density = fused_kernels.forward(pk, x2, per_ray(pk, cond), x.shape[-2])
    return rgb.view(x.shape[:-1] + (3,)), density.view(x.shape[:-1])


def integrated_pos_enc(mean, cov_diag, min_deg, max_deg):
    """`ray_utils.integrated_pos_enc` in bfloat16, in one kernel (on a device where `problem` is None):
    mean, cov_diag `[..., 3]` float32 -> `[..., 6 * (max_deg - min_deg)]` bf16, what autocast feeds the MLP."""
    if max_deg - min_deg > 21:  # 3 * degrees of them in one 64-wide block
        raise ValueError(f'fused integrated_pos_enc: at most 21 degrees, got {max_deg - min_deg}')
    import fused_kernels

    x = fused_kernels.integrated_pos_enc(mean.reshape(-1, 3).float(), cov_diag.reshape(-1, 3).float(), min_deg, max_deg)
    return x.view(mean.shape[:-1] + (-1,))


def _r(t):  # round to bf16, keep float32
    return t.to(torch.bfloat16).float()


def emulate(mlp, x, cond, d_rgb=None, d_density=None):
    """Both kernels' arithmetic in PyTorch (any device): the packed chunks in schedule order with their
    bf16 rounding points, then `weight_grads`. x `[..., S, x_dim]`, cond `[..., cond_dim]` -> raw_rgb
    `[..., S, 3]`, raw_density `[..., S]` float32, and with the upstream gradients d_rgb, d_density
    (shaped as those) the parameters' gradients too. It checks the packing, the schedules and the
    host GEMMs, not the Gluon code."""
    params = [p.detach() for p in mlp.parameters()]
    pk = pack(params)
    S, xd = x.shape[-2], x.shape[-1]
    x2 = x.reshape(-1, xd).to(torch.bfloat16)
    cond2 = cond.reshape(-1, cond.shape[-1]).to(torch.bfloat16)
    n = x2.shape[0]
    npad = -(-n // BM) * BM
    xp = F.pad(x2.float(), (0, XK - xd, 0, npad - n))  # what the zero-filled TMA loads give
    w, wt, prm = pk['w'].float().view(VIEW_C0, WIDTH, KC), pk['wt'].float().view(BWD_TOTAL, WIDTH, KC), pk['params']
    H = torch.zeros(NSAVE, npad, WIDTH, device=x.device)
    h = torch.zeros(npad, WIDTH, device=x.device)
    for c0, nh, nx, row, relu in FWD_SCHEDULE:
        acc = sum(
            (h[:, j * KC : (j + 1) * KC] if j < nh else xp[:, (j - nh) * KC : (j - nh + 1) * KC]) @ w[c0 + j].T
            for j in range(nh + nx)
        )
        v = acc + prm[P_BIAS + row * WIDTH : P_BIAS + (row + 1) * WIDTH]
        h = H[row] = _r(v.clamp_min(0) if relu else v)
        if row == 7:
            density = _r(h @ prm[P_WD : P_WD + WIDTH] + prm[P_BD])
    ray = (torch.arange(npad, device=x.device) // S).clamp_max(n // S - 1)
    pr = per_ray(pk, cond2).float()[ray] * (torch.arange(npad, device=x.device) < n)[:, None]
    V = _r(_r(h @ pk['wv_h'].float().T) + pr).clamp_min(0)
    wrgb = prm[P_WRGB : P_WRGB + 3 * VIEW].view(3, VIEW)
    rgb = _r(V @ wrgb.T + prm[P_BRGB : P_BRGB + 3])
    out = rgb[:n].view(x.shape[:-1] + (3,)), density[:n].view(x.shape[:-1])
    if d_rgb is None:
        return out
    drgb = F.pad(d_rgb.reshape(n, 3).float(), (0, 0, 0, npad - n))
    ddens = F.pad(d_density.reshape(n).float(), (0, npad - n))
    DZ = torch.zeros(NSAVE, npad, WIDTH, device=x.device)
    DV = torch.where(V > 0, _r(_r(drgb) @ wrgb), 0.0)
    a = F.pad(DV, (0, WIDTH - VIEW))
    a = DZ[8] = _r(sum(a[:, j * KC : (j + 1) * KC] @ wt[j].T for j in range(2)))
    for c0, block, mask in BWD_SCHEDULE:
        acc = sum(a[:, j * KC : (j + 1) * KC] @ wt[c0 + j].T for j in range(4))
        if block == 7:
            acc = acc + _r(ddens)[:, None] * prm[P_WD : P_WD + WIDTH]
        a = DZ[block] = torch.where(H[mask] > 0, _r(acc), 0.0)
    bf = torch.bfloat16
    grads = weight_grads(
        params, H.to(bf).view(-1, WIDTH), V.to(bf), DZ.to(bf).view(-1, WIDTH), DV.to(bf), x2, cond2,
        drgb[:n], ddens[:n], S,
    )  # fmt: skip
    return out + (grads,)


@functools.cache
def _device_problem(device):
    if device.type != 'cuda':
        return f'{device} is not a CUDA device'
    if not torch.cuda.is_available():
        return 'CUDA is not available here'
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f'{torch.cuda.get_device_name(device)} is sm_{major}{minor}; the kernels need a Hopper GPU (sm_90)'
    try:
        import fused_kernels  # noqa: F401
    except ImportError as e:
        return f'Triton with Gluon (triton>=3.6) cannot be imported: {e}'
    from model import MLP  # a probe of the default shape: compiles the kernels and checks them once

    try:
        # its own random streams: the caller's (training's sampling, say) stay as they were
        with torch.random.fork_rng(devices=[]):  # (the layers' initialization draws from the CPU's stream)
            torch.random.default_generator.manual_seed(0)
            mlp = MLP(96, 27, 8, WIDTH, 4).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        x, cond, d_rgb, d_density = (
            torch.randn(shape, device=device, generator=gen) for shape in ((3, 100, 96), (3, 27), (3, 100, 3), (3, 100))
        )
        with torch.no_grad():
            rgb, density = forward(mlp, x, cond)
        with torch.enable_grad():  # (asked first from inside a renderer's no_grad, say)
            torch.autograd.backward(forward(mlp, x, cond), (d_rgb, d_density))
        *ref, ref_grads = emulate(mlp, x, cond, d_rgb, d_density)
        err = max((a - b).abs().max().item() / (1 + b.abs().max().item()) for a, b in zip((rgb, density), ref))
        err = max(
            [err]
            + [
                (p.grad - g).abs().max().item() / (1 + g.abs().max().item())
                for p, g in zip(mlp.parameters(), ref_grads)
            ]
        )
    except Exception as e:  # any failure of the tool chain or the launch, reported in one line
        return f'the kernels failed to run: {cli.exception_line(e, 273)}'
    if not err < 0.05:
        return f'the kernels disagree with the plain MLP on this GPU (max relative error {err:.3g})'
    return None


def problem(device):
    """Why the fused kernels cannot run on `device`, as one line, or None.

    On a Hopper GPU it compiles the kernels and compares them once with `emulate`; the answer is
    cached per device for the process."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    return _device_problem(device)


def usable(mlp, device, log=print):
    """Whether `forward` can stand in for `mlp` on `device`: the shape is supported and `problem` is None.

    The first time a CUDA device cannot run the kernels for a supported shape, `log` gets one line
    saying why and that the plain MLP runs instead."""
    if device.type != 'cuda':
        return False
    if mlp not in _SUPPORTED:  # (asked twice per level of every step; a module's shape does not change)
        _SUPPORTED[mlp] = supports(mlp) is None
    if not _SUPPORTED[mlp]:
        return False
    why = problem(device)
    if why is not None and device not in _TOLD:
        _TOLD.add(device)
        log(f'fused MLP kernels: {why}; the plain bf16 MLP runs instead')
    return why is None


_TOLD = set()
_SUPPORTED = weakref.WeakKeyDictionary()  # mlp -> whether `supports` it
