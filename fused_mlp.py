"""The NeRF MLP as two Triton kernels: the bf16 fast path on CUDA (`model.MLP` is the reference).

A plain bf16 MLP of this size is bound by memory, not arithmetic: a 256-wide layer on 524,288
samples does 69 GFLOP (0.1 ms of an H100's tensor cores) but reads and writes 0.5 GB of
activations (0.18 ms), and the bias, the ReLU, its gradient and the bias gradient each add a pass
over them. Here a program carries a tile of BM rows through every layer in one launch:

- forward: per layer, one matrix product from the previous layer's tile (just written, read back
  from L2) with bias, ReLU, the density head and the view branch in its epilogues; the colour and
  density of a tile leave the kernel once. Training keeps each layer's activations (the weight
  gradients need them); rendering cycles two per-program scratch tiles that stay in L2.
- backward: the same walk in reverse, from the colour and density gradients down to the first
  layer: the masked gradient of each layer (the ReLU mask read from the saved activations) and
  its column sums (the bias gradient) come out of one pass. The weight gradients are then one
  large cuBLAS product per layer (G^T A, summed over every row).

The maths is `model.MLP`'s (same parameters, bf16 operands, float32 accumulation, as autocast):
`tests/test_fused_mlp.py` checks the outputs and every parameter gradient against the float32 MLP.
Supported: `MLP`s whose skip input never feeds the heads, with either no colour head (mip-NeRF
360's proposal MLP) or the bottleneck and one view layer (mip-NeRF, mip-NeRF 360); widths that
are multiples of 128 (the view layer a power of two, at most the trunk's width).
"""

import torch

try:  # the kernels need Triton; without it (or CUDA) the plain MLP runs (runs.attach_fast_mlp says so)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    triton = None

BM, BN, BK = 128, 128, 64  # rows per tile, output columns per product, reduction step
LAUNCH = dict(num_warps=8, num_stages=3)
UNROLL_K = False
NO_SKIP = 1 << 20  # a skip period that never fires


def unavailable(device):
    """Why the fused MLP cannot run on `device` (a torch.device), or None when it can."""
    if device.type != 'cuda':
        return f'it needs a CUDA device, not {device.type}'
    if triton is None:
        return 'Triton is not installed'
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f'it needs tensor cores with bf16 (compute capability 8.0+), this GPU has {major}.x'
    return None


def supports(mlp):
    """Whether `mlp` (a model.MLP) has a shape the kernels cover (see the module docstring)."""
    depth, width = len(mlp.trunk), mlp.trunk[0].weight.shape[0]
    if width % BN or mlp._skip_after(depth - 1):
        return False
    if not mlp.has_rgb:
        return True
    if not mlp.use_viewdirs or len(mlp.condition) != 1:
        return False
    bw, cw = mlp.bottleneck.weight.shape[0], mlp.condition[0].weight.shape[0]
    return bw % BN == 0 and bw <= width and cw <= width and cw >= 16 and cw & (cw - 1) == 0


if triton is not None:

    @triton.jit
    def _mm_step(acc, A, lda, arows, amask, K: tl.constexpr, B, ldb, cols, k0, BK: tl.constexpr):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(A + arows[:, None] * lda + kk[None, :], mask=amask[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(B + kk[:, None] * ldb + cols[None, :], mask=kk[:, None] < K, other=0.0)
        return tl.dot(a, b, acc)

    @triton.jit
    def _mm(
        acc, A, lda, arows, amask, K: tl.constexpr, B, ldb, n0, BN: tl.constexpr, BK: tl.constexpr, UNROLL: tl.constexpr
    ):
        """acc `[BM, BN]` += A[arows, :K] @ B[:K, n0:n0 + BN], both row-major."""
        cols = n0 + tl.arange(0, BN)
        if UNROLL:
            for k0 in tl.static_range(0, K, BK):
                acc = _mm_step(acc, A, lda, arows, amask, K, B, ldb, cols, k0, BK)
        else:
            for k0 in tl.range(0, K, BK):
                acc = _mm_step(acc, A, lda, arows, amask, K, B, ldb, cols, k0, BK)
        return acc

    @triton.jit
    def _fwd_kernel(
        X, V, ACT, ACTB, ACTC, RGB, DENS,  # inputs, activations, outputs
        WT0, WTM, WTS, BT, WD, BD, WTB, BB, WTC, WRGB, BRGB,  # weights (transposed: [in, out])
        n_rows, n_rounds, n_samples, s_layer, n_prog,
        XD: tl.constexpr, W: tl.constexpr, D: tl.constexpr, SKIP: tl.constexpr,
        BW: tl.constexpr, CW: tl.constexpr, HAS_RGB: tl.constexpr, TRAIN: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UNROLL: tl.constexpr,
    ):  # fmt: skip
        """Persistent: program p takes tiles p, p + n_prog, ... Trunk activations go to
        ACT[li] (TRAIN: all rows kept) or to the program's scratch rows of ACT[li % 2]."""
        pid = tl.program_id(0)
        local = tl.arange(0, BM)
        for it in range(n_rounds):  # a last round past the end is masked out
            rows = ((pid + it * n_prog) * BM + local).to(tl.int64)
            rmask = rows < n_rows
            if TRAIN:
                arows = rows
            else:
                arows = (pid * BM + local).to(tl.int64)
            dens = tl.zeros([BM], dtype=tl.float32)
            for li in tl.static_range(D):
                if TRAIN:
                    out = ACT + li * s_layer
                    prev = ACT + (li - 1) * s_layer
                else:
                    out = ACT + (li % 2) * s_layer
                    prev = ACT + ((li + 1) % 2) * s_layer
                for n0 in tl.static_range(0, W, BN):
                    acc = tl.zeros([BM, BN], dtype=tl.float32)
                    if li == 0:
                        acc = _mm(acc, X, XD, rows, rmask, XD, WT0, W, n0, BN, BK, UNROLL)
                    else:
                        acc = _mm(acc, prev, W, arows, rmask, W, WTM + (li - 1) * W * W, W, n0, BN, BK, UNROLL)
                        if li > 1:
                            if (li - 1) % SKIP == 0:  # the input joins again after layer li - 1
                                skip_w = WTS + ((li - 1) // SKIP - 1) * XD * W
                                acc = _mm(acc, X, XD, rows, rmask, XD, skip_w, W, n0, BN, BK, UNROLL)
                    cols = n0 + tl.arange(0, BN)
                    h = tl.maximum(acc + tl.load(BT + li * W + cols)[None, :], 0.0).to(ACT.dtype.element_ty)
                    tl.store(out + arows[:, None] * W + cols[None, :], h, mask=rmask[:, None])
                    if li == D - 1:
                        dens += tl.sum(h.to(tl.float32) * tl.load(WD + cols)[None, :], axis=1)
                tl.debug_barrier()  # the layer's tile is written before the next layer reads it
            tl.store(DENS + rows, dens + tl.load(BD), mask=rmask)
            if HAS_RGB:
                if TRAIN:
                    last = ACT + (D - 1) * s_layer
                else:
                    last = ACT + ((D - 1) % 2) * s_layer
                for n0 in tl.static_range(0, BW, BN):  # the bottleneck: no activation
                    acc = tl.zeros([BM, BN], dtype=tl.float32)
                    acc = _mm(acc, last, W, arows, rmask, W, WTB, BW, n0, BN, BK, UNROLL)
                    cols = n0 + tl.arange(0, BN)
                    b = (acc + tl.load(BB + cols)[None, :]).to(ACTB.dtype.element_ty)
                    tl.store(ACTB + arows[:, None] * BW + cols[None, :], b, mask=rmask[:, None])
                tl.debug_barrier()
                acc = tl.zeros([BM, CW], dtype=tl.float32)
                acc = _mm(acc, ACTB, BW, arows, rmask, BW, WTC, CW, 0, CW, BK, UNROLL)
                ccols = tl.arange(0, CW)
                ray = rows // n_samples  # the view term (with the layer's bias) is per ray
                acc += tl.load(V + ray[:, None] * CW + ccols[None, :], mask=rmask[:, None], other=0.0)
                h = tl.maximum(acc, 0.0).to(ACTB.dtype.element_ty)
                if TRAIN:
                    tl.store(ACTC + rows[:, None] * CW + ccols[None, :], h, mask=rmask[:, None])
                hf = h.to(tl.float32)
                for j in tl.static_range(3):
                    c = tl.sum(hf * tl.load(WRGB + j * CW + ccols)[None, :], axis=1) + tl.load(BRGB + j)
                    tl.store(RGB + rows * 3 + j, c, mask=rmask)
                tl.debug_barrier()  # ACTB is read before the next tile writes it

    @triton.jit
    def _bias_sum(BSUM, slot, W: tl.constexpr, cols, g):
        """BSUM[slot, cols] += column sums of g (this program's own row of partial sums)."""
        p = BSUM + slot * W + cols
        tl.store(p, tl.load(p) + tl.sum(g.to(tl.float32), axis=0))

    @triton.jit
    def _bwd_kernel(
        GRGB, GDENS, ACT, ACTC, G, GB, GC, BSUM,  # output gradients, saved activations, results
        WM, WB, WC, WRGB, WD,  # weights as stored: [out, in]
        n_rows, n_rounds, s_layer, n_prog,
        W: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, CW: tl.constexpr, HAS_RGB: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UNROLL: tl.constexpr,
    ):  # fmt: skip
        """Gradients before each ReLU: G[li] (trunk), GB (bottleneck), GC (view layer); BSUM
        `[n_prog, D + 2, W]` gets each program's column sums of them (slots D, D + 1: GB, GC)."""
        pid = tl.program_id(0)
        local = tl.arange(0, BM)
        bsum = BSUM + pid * (D + 2) * W
        for it in range(n_rounds):  # a last round past the end is masked out
            rows = ((pid + it * n_prog) * BM + local).to(tl.int64)
            rmask = rows < n_rows
            if HAS_RGB:
                ccols = tl.arange(0, CW)
                acc = tl.zeros([BM, CW], dtype=tl.float32)
                for j in tl.static_range(3):
                    gj = tl.load(GRGB + rows * 3 + j, mask=rmask, other=0.0)
                    acc += gj[:, None] * tl.load(WRGB + j * CW + ccols)[None, :]
                h = tl.load(ACTC + rows[:, None] * CW + ccols[None, :], mask=rmask[:, None], other=0.0)
                g = tl.where(h > 0, acc, 0.0).to(GC.dtype.element_ty)
                tl.store(GC + rows[:, None] * CW + ccols[None, :], g, mask=rmask[:, None])
                _bias_sum(bsum, D + 1, W, ccols, g)
                tl.debug_barrier()
                for n0 in tl.static_range(0, BW, BN):
                    acc = tl.zeros([BM, BN], dtype=tl.float32)
                    acc = _mm(acc, GC, CW, rows, rmask, CW, WC, BW, n0, BN, BK, UNROLL)
                    cols = n0 + tl.arange(0, BN)
                    g = acc.to(GB.dtype.element_ty)
                    tl.store(GB + rows[:, None] * BW + cols[None, :], g, mask=rmask[:, None])
                    _bias_sum(bsum, D, W, cols, g)
                tl.debug_barrier()
            gd = tl.load(GDENS + rows, mask=rmask, other=0.0)
            for n0 in tl.static_range(0, W, BN):  # the last trunk layer: from the heads
                acc = gd[:, None] * tl.load(WD + n0 + tl.arange(0, BN))[None, :]
                if HAS_RGB:
                    acc = _mm(acc, GB, BW, rows, rmask, BW, WB, W, n0, BN, BK, UNROLL)
                cols = n0 + tl.arange(0, BN)
                h = tl.load(ACT + (D - 1) * s_layer + rows[:, None] * W + cols[None, :], mask=rmask[:, None], other=0.0)
                g = tl.where(h > 0, acc, 0.0).to(G.dtype.element_ty)
                tl.store(G + (D - 1) * s_layer + rows[:, None] * W + cols[None, :], g, mask=rmask[:, None])
                _bias_sum(bsum, D - 1, W, cols, g)
            tl.debug_barrier()
            for i in tl.static_range(D - 1):  # layer li's gradient gives layer li - 1's
                li = D - 1 - i
                for n0 in tl.static_range(0, W, BN):
                    acc = tl.zeros([BM, BN], dtype=tl.float32)
                    acc = _mm(acc, G + li * s_layer, W, rows, rmask, W, WM + (li - 1) * W * W, W, n0, BN, BK, UNROLL)
                    cols = n0 + tl.arange(0, BN)
                    off = (li - 1) * s_layer + rows[:, None] * W + cols[None, :]
                    h = tl.load(ACT + off, mask=rmask[:, None], other=0.0)
                    g = tl.where(h > 0, acc, 0.0).to(G.dtype.element_ty)
                    tl.store(G + off, g, mask=rmask[:, None])
                    _bias_sum(bsum, li - 1, W, cols, g)
                tl.debug_barrier()


def _programs(n_rows, device):
    tiles = triton.cdiv(n_rows, BM)
    if device.type != 'cuda':  # the interpreter (tests on CPU)
        return tiles
    return max(1, min(tiles, 2 * torch.cuda.get_device_properties(device).multi_processor_count))


def _layout(mlp):
    depth = len(mlp.trunk)
    width, x_dim = mlp.trunk[0].weight.shape[0], mlp.trunk[0].weight.shape[1]
    skip = mlp.skip_layer if mlp.skip_layer > 0 else NO_SKIP
    skips = [i for i in range(1, depth) if mlp._skip_after(i - 1)]
    bw = mlp.bottleneck.weight.shape[0] if mlp.has_rgb else 16
    cw = mlp.condition[0].weight.shape[0] if mlp.has_rgb else 16
    return depth, width, x_dim, skip, skips, bw, cw


def _params(mlp):
    """The parameters in the order the autograd function takes them."""
    out = []
    for layer in mlp.trunk:
        out += [layer.weight, layer.bias]
    out += [mlp.density.weight, mlp.density.bias]
    if mlp.has_rgb:
        out += [mlp.bottleneck.weight, mlp.bottleneck.bias, mlp.condition[0].weight, mlp.condition[0].bias]
        out += [mlp.rgb.weight, mlp.rgb.bias]
    return out


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cond, mlp_layout, dtype, train, *params):
        depth, width, x_dim, skip, skips, bw, cw = mlp_layout
        dev = x.device
        lead, samples = x.shape[:-2], x.shape[-2]
        xb = x.reshape(-1, x_dim).to(dtype).contiguous()
        n = xb.shape[0]
        tw = [params[2 * i] for i in range(depth)]
        tb = torch.stack([params[2 * i + 1] for i in range(depth)]).float().contiguous()
        wd, bd = params[2 * depth], params[2 * depth + 1]
        wt0 = tw[0].t().to(dtype).contiguous()
        wtm = torch.stack([w[:, :width].t() for w in tw[1:]]).to(dtype).contiguous() if depth > 1 else wt0
        wts = torch.stack([tw[i][:, width:].t() for i in skips]).to(dtype).contiguous() if skips else wt0
        has_rgb = len(params) > 2 * depth + 2
        rgb = torch.empty(n, 3, device=dev, dtype=torch.float32) if has_rgb else None
        dens = torch.empty(n, device=dev, dtype=torch.float32)
        progs = _programs(n, dev)
        rows = n if train else progs * BM
        act = torch.empty(depth if train else 2, rows, width, device=dev, dtype=dtype)
        actb = torch.empty(rows, bw, device=dev, dtype=dtype)
        actc = torch.empty(n if train and has_rgb else 1, cw, device=dev, dtype=dtype)
        if has_rgb:
            wb, bb, wc, bc, wrgb, brgb = params[2 * depth + 2 :]
            view = torch.nn.functional.linear(cond.reshape(-1, cond.shape[-1]).float(), wc[:, bw:].float(), bc.float())
            heads = [wb.t().to(dtype).contiguous(), bb.float().contiguous(), wc[:, :bw].t().to(dtype).contiguous()]
            heads += [wrgb.float().contiguous(), brgb.float().contiguous()]
        else:
            view = dens  # unused
            heads = [wt0, dens, wt0, dens, dens]
        _fwd_kernel[(progs,)](
            xb, view.contiguous(), act, actb, actc, rgb if has_rgb else dens, dens,
            wt0, wtm, wts, tb, wd.reshape(-1).float().contiguous(), bd.float().contiguous(), heads[0], heads[1],
            heads[2], heads[3], heads[4],
            n, triton.cdiv(triton.cdiv(n, BM), progs), samples, rows * width, progs,
            XD=x_dim, W=width, D=depth, SKIP=skip, BW=bw, CW=cw, HAS_RGB=has_rgb, TRAIN=train,
            BM=BM, BN=BN, BK=BK, UNROLL=UNROLL_K, **LAUNCH,
        )  # fmt: skip
        if train:
            ctx.save_for_backward(xb, cond, act, actb, actc, *params)
            ctx.meta = (mlp_layout, dtype, lead, samples, has_rgb)
        dens = dens.view(*lead, samples)
        return (rgb.view(*lead, samples, 3) if has_rgb else None), dens

    @staticmethod
    def backward(ctx, g_rgb, g_dens):
        (depth, width, x_dim, skip, skips, bw, cw), dtype, lead, samples, has_rgb = ctx.meta
        xb, cond, act, actb, actc, *params = ctx.saved_tensors
        n, dev = xb.shape[0], xb.device
        tw = [params[2 * i] for i in range(depth)]
        wd = params[2 * depth]
        g_dens = (torch.zeros(n, device=dev) if g_dens is None else g_dens.reshape(n)).float().contiguous()
        g = torch.empty(depth, n, width, device=dev, dtype=dtype)
        gb = torch.empty(n if has_rgb else 1, bw, device=dev, dtype=dtype)
        gc = torch.empty(n if has_rgb else 1, cw, device=dev, dtype=dtype)
        progs = _programs(n, dev)
        bsum = torch.zeros(progs, depth + 2, width, device=dev, dtype=torch.float32)
        wm = torch.stack([w[:, :width] for w in tw[1:]]).to(dtype).contiguous() if depth > 1 else xb
        if has_rgb:
            wb, _, wc, _, wrgb, _ = params[2 * depth + 2 :]
            g_rgb = (torch.zeros(n, 3, device=dev) if g_rgb is None else g_rgb.reshape(n, 3)).float().contiguous()
            hw = [wb.to(dtype).contiguous(), wc[:, :bw].to(dtype).contiguous(), wrgb.float().contiguous()]
        else:
            g_rgb, hw = g_dens, [xb, xb, g_dens]
        _bwd_kernel[(progs,)](
            g_rgb, g_dens, act, actc, g, gb, gc, bsum,
            wm, hw[0], hw[1], hw[2], wd.reshape(-1).float().contiguous(),
            n, triton.cdiv(triton.cdiv(n, BM), progs), n * width, progs,
            W=width, D=depth, BW=bw, CW=cw, HAS_RGB=has_rgb, BM=BM, BN=BN, BK=BK, UNROLL=UNROLL_K, **LAUNCH,
        )  # fmt: skip
        bias = bsum.sum(0)

        def wgrad(grad, inp):  # grad^T @ inp over all rows, float32 like the parameter
            return torch.mm(grad.t(), inp).float()

        grads = []
        for i in range(depth):
            inp = xb if i == 0 else act[i - 1]
            w = wgrad(g[i], inp)
            if i in skips:
                w = torch.cat([w, wgrad(g[i], xb)], 1)
            grads += [w, bias[i]]
        gd_b = g_dens.to(dtype)[:, None]
        grads += [wgrad(gd_b, act[depth - 1]), g_dens.sum()[None]]
        g_cond = None
        if has_rgb:
            wc = params[2 * depth + 4]
            per_ray = gc.view(-1, samples, cw).float().sum(1)  # the view term's gradient, per ray
            c = cond.reshape(-1, cond.shape[-1]).float()
            grads += [wgrad(gb, act[depth - 1]), bias[depth, :bw]]
            grads += [torch.cat([wgrad(gc, actb), per_ray.t() @ c], 1), bias[depth + 1, :cw]]
            grads += [wgrad(g_rgb.to(dtype), actc), g_rgb.sum(0)]
            if ctx.needs_input_grad[1]:
                g_cond = (per_ray @ wc[:, bw:].float()).view(cond.shape)
        g_x = None
        if ctx.needs_input_grad[0]:  # normals: the gradient reaches the encoded input
            g_x = torch.mm(g[0], tw[0].to(dtype)).float()
            for i in skips:
                g_x += torch.mm(g[i], tw[i][:, width:].to(dtype)).float()
            g_x = g_x.view(*lead, samples, x_dim)
        grads = [gr.to(p.dtype).view(p.shape) for gr, p in zip(grads, params)]
        return (g_x, g_cond, None, None, None, *grads)


def forward(mlp, x, cond=None, dtype=torch.bfloat16):
    """`mlp(x, cond)` through the kernels: raw_rgb `[..., S, 3]` (None without a colour head) and
    raw_density `[..., S]`, float32. x: `[..., S, x_dim]`; cond: `[..., cond_dim]` per ray."""
    params = _params(mlp)
    train = torch.is_grad_enabled() and any(
        t.requires_grad for t in [x, *params] + ([cond] if cond is not None else [])
    )
    return _FusedMLP.apply(x, cond, _layout(mlp), dtype, train, *params)
