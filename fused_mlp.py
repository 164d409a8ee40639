"""The mip-NeRF MLP as two fused Triton kernels (bf16 on CUDA): same function, fewer bytes.

Vocabulary: M rows (samples; R rays x S samples each), W = net_width = 2 * H
(each activation is kept as two halves of H columns, so every matrix product
is a sum of H x H tiles), D trunk layers, C = net_width_condition, X the IPE
width padded to a power of two with zero weights.

The layer-by-layer MLP (`model.MLP`) writes every activation to memory and
reads it back in the next GEMM, the ReLU and the backward pass; at 524k rows x
256 columns each of those passes is memory-bound. Here:

- forward (`_fwd_kernel`): one program takes BM rows through the whole network
  with the activations in registers: trunk (bias + ReLU epilogues, the skip
  input as a second summed GEMM), density head, bottleneck, view layer (its
  view-direction term computed once per ray outside, `pr`), RGB head. For
  training it also stores the post-ReLU activations (bf16), which the backward
  pass needs; for rendering it stores nothing.
- backward (`_bwd_kernel`): one program takes BM rows back through the network,
  dZ_i = (dZ_{i+1} W_{i+1}) * [H_i > 0], storing each dZ_i and per-block bias
  sums. The weight gradients dW_i = dZ_i^T X_i are then plain cuBLAS GEMMs
  over all rows.

Precision is that of `torch.autocast(bfloat16)` around the plain MLP: bf16
operands, float32 accumulation, bf16 activations and gradients; the returned
raw RGB and density are float32. `tests/test_fused.py` compares both
directions with the plain module. Only inputs that need no gradient are
supported (the MLP's input is a function of the rays, not of parameters);
normals, which differentiate with respect to the input, take the plain path.

Speed (H100, misc/benchmarks.md): faster than the eager bf16 MLP, slower than
torch.compile for now, so `--kernels triton` is opt-in. See `_mma_sync` for why
the kernels avoid Hopper's wgmma.
"""
import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain PyTorch MLP is used
    triton = None

RGB_PAD = 16   # the 3 RGB outputs padded to the smallest tl.dot width
# Rows per program and warps per program of each kernel (tuned on an H100, misc/benchmarks.md).
LAUNCH = {'fwd': (32, 4), 'fwd_nosave': (64, 4), 'bwd': (32, 4)}


def available():
    """Whether Triton is importable (kernels run on CUDA, or on CPU with TRITON_INTERPRET=1)."""
    return triton is not None


def supported(mlp):
    """None if the kernels handle this `model.MLP`'s shape, else the reason (str)."""
    w, c = mlp.net_width, mlp.net_width_condition
    pow2 = lambda n: n & (n - 1) == 0
    if not mlp.use_viewdirs or len(mlp.condition) != 1:
        return 'needs view directions and one condition layer'
    if not (pow2(w) and 32 <= w <= 256 and pow2(c) and 16 <= c <= 256):
        return 'needs net_width and net_width_condition powers of two in [32, 256] and [16, 256]'
    if mlp._skip_after(len(mlp.trunk) - 1):
        return 'needs no skip after the last trunk layer'
    return None


if triton is not None:
    # Triton's CPU interpreter (TRITON_INTERPRET=1, used to test the kernels without a GPU) gets
    # bf16 tl.dot wrong; there the operands, exact bf16 values, are multiplied as float32.
    _INTERPRET = tl.constexpr(os.environ.get('TRITON_INTERPRET') == '1')

    @triton.jit
    def _dot(a, b, acc):
        """acc + a @ b with float32 accumulation."""
        if _INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _mm2(a0, a1, w_ptr, ldw, col0, H: tl.constexpr, N: tl.constexpr):
        """[a0 a1] @ w[0:2H, col0:col0+N] for w row-major with leading dimension ldw (float32)."""
        k = tl.arange(0, H)
        n = col0 + tl.arange(0, N)
        acc = _dot(a0, tl.load(w_ptr + k[:, None] * ldw + n[None, :]), tl.zeros((a0.shape[0], N), tl.float32))
        return _dot(a1, tl.load(w_ptr + (k + H)[:, None] * ldw + n[None, :]), acc)

    @triton.jit
    def _trunk_half(x, h0, h1, wx_ptr, wh_ptr, bh_ptr, i, takes_x, half: tl.constexpr, FIRST: tl.constexpr, kx, nh,
                    X: tl.constexpr, H: tl.constexpr, BM: tl.constexpr):
        """Columns [half*H, half*H + H) of trunk layer i: relu(bias + [h0 h1] Wh + x Wx), bf16.

        Layer 0 (FIRST) reads x only; a later layer reads x too when it follows a skip (takes_x).
        """
        W: tl.constexpr = 2 * H
        acc = tl.zeros((BM, H), tl.float32) + tl.load(bh_ptr + i * W + half * H + nh)[None, :]
        wx = wx_ptr + i * X * W + kx[:, None] * W + half * H + nh[None, :]
        if FIRST:
            acc = _dot(x, tl.load(wx), acc)
        else:
            acc += _mm2(h0, h1, wh_ptr + i * W * W, W, half * H, H, H)
            if takes_x:
                acc = _dot(x, tl.load(wx), acc)
        return tl.maximum(acc, 0.).to(tl.bfloat16)

    @triton.jit
    def _fwd_kernel(x_ptr, pr_ptr, xin_ptr, wx_ptr, wh_ptr, bh_ptr, wd_ptr, bd_ptr, wb_ptr, bb_ptr, wv_ptr, wr_ptr,
                    br_ptr, rgb_ptr, dens_ptr, hs_ptr, bt_ptr, v_ptr, M, S,
                    X: tl.constexpr, H: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                    SAVE: tl.constexpr, BM: tl.constexpr):
        W: tl.constexpr = 2 * H
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        r64 = rows.to(tl.int64)
        kx = tl.arange(0, X)
        nh = tl.arange(0, H)
        x = tl.load(x_ptr + r64[:, None] * X + kx[None, :], mask=rmask[:, None], other=0.)
        z = tl.zeros((BM, H), tl.bfloat16)
        h0 = _trunk_half(x, z, z, wx_ptr, wh_ptr, bh_ptr, 0, 1, 0, True, kx, nh, X, H, BM)
        h1 = _trunk_half(x, z, z, wx_ptr, wh_ptr, bh_ptr, 0, 1, 1, True, kx, nh, X, H, BM)
        if SAVE:
            base = r64[:, None] * W + nh[None, :]
            tl.store(hs_ptr + base, h0, mask=rmask[:, None])
            tl.store(hs_ptr + base + H, h1, mask=rmask[:, None])
        for i in range(1, D):   # a loop, not unrolled: the same code for every layer
            takes_x = tl.load(xin_ptr + i)
            n0 = _trunk_half(x, h0, h1, wx_ptr, wh_ptr, bh_ptr, i, takes_x, 0, False, kx, nh, X, H, BM)
            h1 = _trunk_half(x, h0, h1, wx_ptr, wh_ptr, bh_ptr, i, takes_x, 1, False, kx, nh, X, H, BM)
            h0 = n0
            if SAVE:
                base = (i * M + r64)[:, None] * W + nh[None, :]
                tl.store(hs_ptr + base, h0, mask=rmask[:, None])
                tl.store(hs_ptr + base + H, h1, mask=rmask[:, None])
        # Density head (a dot product per row), bottleneck (no activation).
        dens = (tl.sum(h0.to(tl.float32) * tl.load(wd_ptr + nh)[None, :], 1)
                + tl.sum(h1.to(tl.float32) * tl.load(wd_ptr + H + nh)[None, :], 1) + tl.load(bd_ptr))
        tl.store(dens_ptr + r64, dens, mask=rmask)
        b0 = (_mm2(h0, h1, wb_ptr, W, 0, H, H) + tl.load(bb_ptr + nh)[None, :]).to(tl.bfloat16)
        b1 = (_mm2(h0, h1, wb_ptr, W, H, H, H) + tl.load(bb_ptr + H + nh)[None, :]).to(tl.bfloat16)
        if SAVE:
            base = r64[:, None] * W + nh[None, :]
            tl.store(bt_ptr + base, b0, mask=rmask[:, None])
            tl.store(bt_ptr + base + H, b1, mask=rmask[:, None])
        # View layer: bottleneck GEMM plus the per-ray view-direction term (bias included).
        nc = tl.arange(0, C)
        pr = tl.load(pr_ptr + (r64 // S)[:, None] * C + nc[None, :], mask=rmask[:, None], other=0.)
        v = tl.maximum(_mm2(b0, b1, wv_ptr, C, 0, H, C) + pr, 0.).to(tl.bfloat16)
        if SAVE:
            tl.store(v_ptr + r64[:, None] * C + nc[None, :], v, mask=rmask[:, None])
        n16 = tl.arange(0, 16)
        wr = tl.load(wr_ptr + nc[:, None] * 16 + n16[None, :])
        rgb = _dot(v, wr, tl.zeros((BM, 16), tl.float32)) + tl.load(br_ptr + n16)[None, :]
        tl.store(rgb_ptr + r64[:, None] * 3 + n16[None, :], rgb, mask=rmask[:, None] & (n16[None, :] < 3))

    @triton.jit
    def _bwd_kernel(drgb_ptr, ddens_ptr, hs_ptr, v_ptr, wh_ptr, wd_ptr, wb_ptr, wv_ptr, wr_ptr,
                    g_ptr, gb_ptr, gv_ptr, part_ptr, M,
                    H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
        """Weights here are in PyTorch's [out, in] layout: dX = dZ @ W."""
        W: tl.constexpr = 2 * H
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < M
        r64 = rows.to(tl.int64)
        nh = tl.arange(0, H)
        nc = tl.arange(0, C)
        n16 = tl.arange(0, 16)
        part = part_ptr + pid * (D + 1) * W
        # RGB head and view layer.
        dr = tl.load(drgb_ptr + r64[:, None] * 3 + n16[None, :], mask=rmask[:, None] & (n16[None, :] < 3), other=0.)
        dv = _dot(dr.to(tl.bfloat16), tl.load(wr_ptr + n16[:, None] * C + nc[None, :]), tl.zeros((BM, C), tl.float32))
        v = tl.load(v_ptr + r64[:, None] * C + nc[None, :], mask=rmask[:, None], other=0.)
        dzv = tl.where(v > 0, dv, 0.).to(tl.bfloat16)
        tl.store(gv_ptr + r64[:, None] * C + nc[None, :], dzv, mask=rmask[:, None])
        # Bottleneck (linear): its gradient, stored for dW and its bias.
        k = tl.arange(0, C)
        db0 = _dot(dzv, tl.load(wv_ptr + k[:, None] * W + nh[None, :]), tl.zeros((BM, H), tl.float32))
        db1 = _dot(dzv, tl.load(wv_ptr + k[:, None] * W + H + nh[None, :]), tl.zeros((BM, H), tl.float32))
        tl.store(part + D * W + nh, tl.sum(db0, 0))
        tl.store(part + D * W + H + nh, tl.sum(db1, 0))
        db0 = db0.to(tl.bfloat16)
        db1 = db1.to(tl.bfloat16)
        base = r64[:, None] * W + nh[None, :]
        tl.store(gb_ptr + base, db0, mask=rmask[:, None])
        tl.store(gb_ptr + base + H, db1, mask=rmask[:, None])
        # Into the last trunk layer: from the bottleneck and from the density head.
        dd = tl.load(ddens_ptr + r64, mask=rmask, other=0.)
        g0 = _mm2(db0, db1, wb_ptr, W, 0, H, H) + dd[:, None] * tl.load(wd_ptr + nh)[None, :]
        g1 = _mm2(db0, db1, wb_ptr, W, H, H, H) + dd[:, None] * tl.load(wd_ptr + H + nh)[None, :]
        for j in range(0, D):
            i = D - 1 - j
            base = (i * M + r64)[:, None] * W + nh[None, :]
            z0 = tl.where(tl.load(hs_ptr + base, mask=rmask[:, None], other=0.) > 0, g0, 0.)
            z1 = tl.where(tl.load(hs_ptr + base + H, mask=rmask[:, None], other=0.) > 0, g1, 0.)
            tl.store(part + i * W + nh, tl.sum(z0, 0))
            tl.store(part + i * W + H + nh, tl.sum(z1, 0))
            z0 = z0.to(tl.bfloat16)
            z1 = z1.to(tl.bfloat16)
            tl.store(g_ptr + base, z0, mask=rmask[:, None])
            tl.store(g_ptr + base + H, z1, mask=rmask[:, None])
            if i > 0:
                g0 = _mm2(z0, z1, wh_ptr + i * W * W, W, 0, H, H)
                g1 = _mm2(z0, z1, wh_ptr + i * W * W, W, H, H, H)


@contextlib.contextmanager
def _mma_sync():
    """Compile with mma.sync instead of Hopper's wgmma.

    Triton 3.6 (as shipped with torch 2.11) miscompiles these chained
    register-operand dots with wgmma on the H100: wrong results and illegal
    memory accesses (also reported upstream, triton-lang/triton#10486 and
    #11366). Triton reads DISABLE_MMA_V3 when it compiles; it is set only
    around the kernels' launches (compilation happens in the first one).
    """
    old = os.environ.get('DISABLE_MMA_V3')
    os.environ['DISABLE_MMA_V3'] = '1'
    try:
        yield
    finally:
        if old is None:
            del os.environ['DISABLE_MMA_V3']
        else:
            os.environ['DISABLE_MMA_V3'] = old


def _pow2_at_least(n, lo=16):
    p = lo
    while p < n:
        p *= 2
    return p


class Packed:
    """The MLP's weights in the kernels' layouts (bf16 matrices, float32 vectors).

    Built from the live parameters once per optimizer step and shared by both
    levels and both directions (`model.MLP` caches it by parameter version).
    """

    def __init__(self, mlp):
        bf, f32 = torch.bfloat16, torch.float32
        D, Wd = len(mlp.trunk), mlp.net_width
        self.x_dim, self.D, self.H, self.C = mlp.x_dim, D, Wd // 2, mlp.net_width_condition
        self.X = _pow2_at_least(mlp.x_dim)
        dev = mlp.trunk[0].weight.device
        wx = torch.zeros(D, self.X, Wd, dtype=bf, device=dev)      # [in, out] x-input weights per layer
        wh = torch.zeros(D, Wd, Wd, dtype=bf, device=dev)          # [in, out] h-input weights (forward)
        self.takes_x = [i == 0 or mlp._skip_after(i - 1) for i in range(D)]   # layer i reads x
        for i, layer in enumerate(mlp.trunk):
            w = layer.weight.detach()
            h_in = 0 if i == 0 else Wd   # the x columns follow the h columns in the official concat
            if self.takes_x[i]:
                wx[i, :mlp.x_dim] = w[:, h_in:].t()
            if i > 0:
                wh[i] = w[:, :Wd].t()
        self.xin = torch.tensor(self.takes_x, dtype=torch.int32, device=dev)
        self.wx, self.wh = wx.contiguous(), wh.contiguous()
        self.whT = wh.transpose(1, 2).contiguous()                 # [out, in] (backward)
        self.bh = torch.stack([l.bias.detach() for l in mlp.trunk]).to(f32).contiguous()
        self.wd = mlp.density.weight.detach()[0].to(f32).contiguous()
        self.bd = mlp.density.bias.detach().to(f32).contiguous()
        wb = mlp.bottleneck.weight.detach().to(bf)
        self.wb, self.wbT = wb.t().contiguous(), wb.contiguous()
        self.bb = mlp.bottleneck.bias.detach().to(f32).contiguous()
        wv = mlp.condition[0].weight.detach()[:, :Wd].to(bf)
        self.wv, self.wvT = wv.t().contiguous(), wv.contiguous()
        wr = torch.zeros(RGB_PAD, self.C, dtype=bf, device=dev)
        wr[:3] = mlp.rgb.weight.detach()
        self.wr, self.wrT = wr.t().contiguous(), wr
        self.br = torch.zeros(RGB_PAD, dtype=f32, device=dev)
        self.br[:3] = mlp.rgb.bias.detach()


def _launch_fwd(p, x, pr, S, save):
    block, warps = LAUNCH['fwd' if save else 'fwd_nosave']
    M = x.shape[0]
    dev = x.device
    rgb = torch.empty(M, 3, dtype=torch.float32, device=dev)
    dens = torch.empty(M, dtype=torch.float32, device=dev)
    if save:
        hs = torch.empty(p.D, M, 2 * p.H, dtype=torch.bfloat16, device=dev)
        bt = torch.empty(M, 2 * p.H, dtype=torch.bfloat16, device=dev)
        v = torch.empty(M, p.C, dtype=torch.bfloat16, device=dev)
    else:
        hs = bt = v = rgb   # never written
    with _mma_sync():
        _fwd_kernel[(triton.cdiv(M, block),)](
            x, pr, p.xin, p.wx, p.wh, p.bh, p.wd, p.bd, p.wb, p.bb, p.wv, p.wr, p.br, rgb, dens, hs, bt, v, M, S,
            X=p.X, H=p.H, C=p.C, D=p.D, SAVE=save, BM=block, num_warps=warps, num_stages=1)
    return rgb, dens, (hs, bt, v)


class _FusedMLP(torch.autograd.Function):
    """raw_rgb `[M, 3]`, raw_density `[M]` (float32) from x `[M, X]` bf16 and pr `[R, C]` float32."""

    @staticmethod
    def forward(ctx, x, pr, S, packed, *params):
        rgb, dens, saved = _launch_fwd(packed, x, pr, S, save=True)
        ctx.packed, ctx.S = packed, S
        ctx.save_for_backward(x, *saved)
        return rgb, dens

    @staticmethod
    def backward(ctx, drgb, ddens):
        x, hs, bt, v = ctx.saved_tensors
        p, S = ctx.packed, ctx.S
        M, W = x.shape[0], 2 * p.H
        block, warps = LAUNCH['bwd']
        drgb = drgb.float().contiguous()
        ddens = ddens.float().contiguous()
        g = torch.empty(p.D, M, W, dtype=torch.bfloat16, device=x.device)
        gb = torch.empty(M, W, dtype=torch.bfloat16, device=x.device)
        gv = torch.empty(M, p.C, dtype=torch.bfloat16, device=x.device)
        nblk = triton.cdiv(M, block)
        part = torch.empty(nblk, p.D + 1, W, dtype=torch.float32, device=x.device)
        with _mma_sync():
            _bwd_kernel[(nblk,)](drgb, ddens, hs, v, p.whT, p.wd, p.wbT, p.wvT, p.wrT, g, gb, gv, part, M,
                                 H=p.H, C=p.C, D=p.D, BM=block, num_warps=warps, num_stages=1)
        bias = part.sum(0)
        xs = x[:, :p.x_dim]
        grads = []
        for i in range(p.D):   # trunk weights: dW_i = dZ_i^T [H_{i-1}, x]
            parts = [] if i == 0 else [g[i].t() @ hs[i - 1]]
            if p.takes_x[i]:
                parts.append(g[i].t() @ xs)
            grads.append(torch.cat(parts, 1).float())
        grads += [bias[i] for i in range(p.D)]
        grads.append((ddens.to(torch.bfloat16)[None] @ hs[-1]).float())       # density weight [1, W]
        grads.append(ddens.sum()[None])                                       # density bias
        grads.append((gb.t() @ hs[-1]).float())                               # bottleneck weight
        grads.append(bias[p.D])                                               # bottleneck bias
        dwv = (gv.t() @ bt).float()                                           # view weight, bottleneck columns
        grads.append(dwv)   # the view-direction columns get their gradient through pr, outside
        grads.append((drgb.to(torch.bfloat16).t() @ v).float())              # rgb weight [3, C]
        grads.append(drgb.sum(0))                                             # rgb bias
        dpr = gv.view(-1, S, p.C).float().sum(1)
        return (None, dpr, None, None, *grads)


def mlp_params(mlp):
    """The parameters in the order `_FusedMLP` returns their gradients.

    The view layer's weight is passed as its bottleneck columns only; its
    view-direction columns and bias act through `pr`, computed outside.
    """
    params = [l.weight for l in mlp.trunk] + [l.bias for l in mlp.trunk]
    Wd = mlp.net_width
    params += [mlp.density.weight, mlp.density.bias, mlp.bottleneck.weight, mlp.bottleneck.bias,
               mlp.condition[0].weight[:, :Wd], mlp.rgb.weight, mlp.rgb.bias]
    return params


@torch.compiler.disable
def fused_forward(mlp, packed, x, cond):
    """`model.MLP.forward` through the kernels: x `[..., S, x_dim]`, cond `[..., cond_dim]` (float32).

    Returns raw_rgb `[..., S, 3]`, raw_density `[..., S]` in float32.
    """
    lead, S = x.shape[:-2], x.shape[-2]
    M = x.shape[:-1].numel()
    xb = x.reshape(M, -1).to(torch.bfloat16)
    if packed.X != xb.shape[1]:
        xb = torch.nn.functional.pad(xb, (0, packed.X - xb.shape[1]))
    first = mlp.condition[0]
    pr = torch.nn.functional.linear(cond.reshape(-1, cond.shape[-1]).float(),
                                    first.weight[:, mlp.net_width:].float(), first.bias.float()).contiguous()
    params = mlp_params(mlp)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params + [pr]):
        rgb, dens = _FusedMLP.apply(xb.contiguous(), pr, S, packed, *params)
    else:
        rgb, dens, _ = _launch_fwd(packed, xb.contiguous(), pr, S, save=False)
    return rgb.view(*lead, S, 3), dens.view(*lead, S)
