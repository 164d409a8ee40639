"""Gluon kernels for Hopper (sm_90a) behind `fused_mlp.py`: the default MLP's forward in one launch.

Imported only where `fused_mlp.problem` found a Hopper GPU and Triton with Gluon. Design (numbers
from an H100, 2026-11-27):

- Persistent grid: min(#tiles, #SMs) CTAs; CTA `pid` takes the 128-row tiles pid, pid + P, ...; 8 warps
  = 2 warpgroups, MMA layout warps_per_cta=[8, 1] (warpgroup 0 rows 0-63, 1 rows 64-127; a row's 256
  columns in one warp, so the head reductions need no shared memory).
- Shared memory: h [128, 256] bf16 (the current activation, 128-byte swizzle), the input x as
  [2, 128, 64] bf16 (TMA zero-fills columns past its 96 and rows past N), and a ring of STAGES weight
  slots [256, 64] bf16 (32 KB each): 229,416 B with 4 stages.
- The weights, packed by `fused_mlp.pack` as 36 K chunks [256 (out), 64 (in)] (K contiguous: wgmma
  reads the permuted slot as a K-major B) plus the view weight [128, 256] through its own [128, 64]
  descriptor into the first half of a slot, stream by TMA through the ring: every tile consumes the
  same 40 chunks, and the stream runs on across layers and tiles (the next tile's first chunks are
  fetched while this one finishes).
- Per chunk: wait for its slot's mbarrier, issue an async wgmma (A: a 64-wide K slice of h or x in
  shared memory, B: the slot), wait until at most one is in flight, barrier, refill the previous
  chunk's slot with the chunk STAGES - 1 ahead.
- Per layer, in registers: + bias, ReLU, -> bf16, stored over h (barriers around the store,
  fence_async_shared before the next wgmma reads it). Layer 7's epilogue also gives the density (a
  row reduction), the view layer adds the per-ray term (gathered by row // S) and the rgb head is
  three row reductions. Outputs are masked stores.

Patterns from the Triton Gluon tutorials 05-wgmma.py (layouts, async wgmma and its wait, a K-major
B through permute, store + fence before an async reader) and 07-persistence.py (the TMA ring with
one mbarrier per slot and phase = position // slots & 1, the persistent loop); API names as in
triton 3.6.0's triton.experimental.gluon.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fused_mlp import BM, KC, NUM_WARPS, P_BD, P_BIAS, P_BRGB, P_WD, P_WRGB, STAGES, TOTAL_CHUNKS, VIEW, VIEW_C0, WIDTH


@gluon.jit
def _issue_chunk(
    p, CID: gl.constexpr, w_desc, wv_desc, w_ring, ready, pred, STAGES: gl.constexpr, VIEW_C0: gl.constexpr
):
    """TMA chunk CID of the static schedule into ring slot p % STAGES (p: its global position).

    Modelled on issue_loads() in triton python/tutorials/gluon/07-persistence.py (expect the byte
    count on the slot's barrier, then async_copy_global_to_shared with the same barrier)."""
    s = p % STAGES
    bar = ready.index(s)
    if CID >= VIEW_C0:
        # view weight Wv[:, :256] is [128, 256]: box [128, 64] into the first half of the slot
        mbarrier.expect(bar, wv_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(
            wv_desc, [0, (CID - VIEW_C0) * 64], bar, w_ring.index(s).slice(0, 128, dim=0), pred
        )
    else:
        mbarrier.expect(bar, w_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(w_desc, [CID * 256, 0], bar, w_ring.index(s), pred)


@gluon.jit
def _layer(
    acc,
    h_smem,
    x_smem,
    w_ring,
    ready,
    w_desc,
    wv_desc,
    base,
    has_next,  #
    C0: gl.constexpr,
    NH: gl.constexpr,
    NX: gl.constexpr,
    NOUT: gl.constexpr,  #
    STAGES: gl.constexpr,
    TOTAL: gl.constexpr,
    VIEW_C0: gl.constexpr,
    KC: gl.constexpr,
):
    """acc = [h | x] @ W^T over the NH + NX chunks starting at schedule position C0.

    The wait(1)-after-issue pipelining follows the async-wgmma pattern of
    python/tutorials/gluon/05-wgmma.py (blocked_mma_kernel, OVERLAP_MMA) and 07-persistence.py
    (issue_mma: mbarrier.wait(bars.index(i), phase) then warpgroup_mma(..., is_async=True))."""
    for j in gl.static_range(NH + NX):
        g = base + (C0 + j)  # global position of this chunk in the CTA's chunk stream
        s = g % STAGES
        mbarrier.wait(ready.index(s), (g // STAGES) & 1)
        if j < NH:
            a = h_smem.slice(j * KC, KC, dim=1)  # [BM, 64] K-slice of h (16 KB-aligned block)
        else:
            a = x_smem.index(j - NH)  # [BM, 64] K-slice of the skip input
        if NOUT == 256:
            b = w_ring.index(s).permute((1, 0))  # [64, 256], K-major
        else:
            b = w_ring.index(s).slice(0, NOUT, dim=0).permute((1, 0))  # [64, NOUT]
        acc = warpgroup_mma(a, b, acc, use_acc=(j > 0), is_async=True)
        # <= 1 wgmma in flight: the previous chunk's slot has been read by this warpgroup
        acc = warpgroup_mma_wait(1, deps=(acc,))
        # ... and by the other warpgroup: the slot is refilled by one elected thread of warp 0
        gl.thread_barrier()
        # schedule position of the chunk to prefetch: C0 + j + STAGES - 1 (a constexpr; not bound
        # to an annotated name because static_range bodies may not re-assign a constexpr)
        if C0 + j + STAGES - 1 < TOTAL:
            _issue_chunk(g + STAGES - 1, C0 + j + STAGES - 1, w_desc, wv_desc, w_ring, ready, True, STAGES, VIEW_C0)
        else:  # the next tile's chunk (same weights), only if this CTA has a next tile
            _issue_chunk(
                g + STAGES - 1, C0 + j + STAGES - 1 - TOTAL, w_desc, wv_desc, w_ring, ready, has_next, STAGES, VIEW_C0
            )
    acc = warpgroup_mma_wait(0, deps=(acc,))
    return acc


@gluon.jit
def _store_h(h_smem, hb):
    """Write the next activation in place of the one the wgmmas just finished reading.

    Local store then fence_async_shared before an async-proxy reader, as 05-wgmma.py does before
    its TMA store (wgmma reads shared memory through the async proxy, like TMA)."""
    gl.thread_barrier()  # every warpgroup has retired its wgmmas on h (wait(0) in _layer)
    h_smem.store(hb)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _bias_relu(
    acc,
    params_ptr,
    LAYER: gl.constexpr,
    RELU: gl.constexpr,
    mma: gl.constexpr,
    WIDTH: gl.constexpr,
    P_BIAS: gl.constexpr,
):
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, mma))
    bias = gl.load(params_ptr + P_BIAS + LAYER * WIDTH + cols)
    v = acc + gl.expand_dims(bias, 0)
    if RELU:  # relu(bf16(v)) == bf16(relu(v)): round once, after the ReLU (gl.maximum on bf16
        v = gl.maximum(v, 0.0)  # tensors came out fp32 in a test compile)
    v = v.to(gl.bfloat16)  # autocast: F.linear's output is bf16
    return v


@gluon.jit
def mlp_fwd_kernel(
    x_desc,
    w_desc,
    wv_desc,
    params_ptr,
    per_ray_ptr,
    rgb_ptr,
    dens_ptr,  #
    N,
    S,
    num_tiles,  #
    BM: gl.constexpr,
    WIDTH: gl.constexpr,
    KC: gl.constexpr,
    VIEW: gl.constexpr,
    STAGES: gl.constexpr,
    TOTAL: gl.constexpr,
    VIEW_C0: gl.constexpr,  #
    P_BIAS: gl.constexpr,
    P_WD: gl.constexpr,
    P_WRGB: gl.constexpr,
    P_BRGB: gl.constexpr,
    P_BD: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 8, 'the layouts below assume 2 warpgroups over BM=128 rows')
    gl.static_assert(BM == 128)
    # wgmma accumulator layouts: instr_shape [m=16, n, k=256/16], warps stacked along M so that a
    # row's columns live in one warp (row reductions need no shared memory). The instr-n rule
    # (n | N, n <= maxN = N / ceil(num_warps / (BM/16))) is from 05-wgmma.py.
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, WIDTH, 16])
    mma_v: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, VIEW, 16])
    h_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, WIDTH], gl.bfloat16)

    # --- shared memory: h 64 KB, x 32 KB, ring STAGES x 32 KB, barriers ---
    h_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, WIDTH], h_layout)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BM, KC], x_desc.layout)
    w_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, WIDTH, KC], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    mbarrier.init(x_bar.index(0), count=1)
    fence_async_shared()  # make the barrier inits visible to the async proxy (TMA)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    # --- prologue: this CTA's first x tile and the first STAGES-1 weight chunks ---
    mbarrier.expect(x_bar.index(0), 2 * x_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [pid * BM, 0], x_bar.index(0), x_smem.index(0))
    tma.async_copy_global_to_shared(x_desc, [pid * BM, KC], x_bar.index(0), x_smem.index(1))
    for c in gl.static_range(STAGES - 1):
        _issue_chunk(c, c, w_desc, wv_desc, w_ring, ready, True, STAGES, VIEW_C0)

    rows_l = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    rows_lv = gl.arange(0, BM, layout=gl.SliceLayout(1, mma_v))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, mma))
    cols_v = gl.arange(0, VIEW, layout=gl.SliceLayout(0, mma_v))

    it = 0
    for tile in range(pid, num_tiles, nprog):
        base = it * TOTAL
        row0 = tile * BM
        has_next = tile + nprog < num_tiles

        mbarrier.wait(x_bar.index(0), it & 1)

        # layer 0: x (96 -> 128 zero-padded) -> 256
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(
            acc,
            h_smem,
            x_smem,
            w_ring,
            ready,
            w_desc,
            wv_desc,
            base,
            has_next,  #
            0,
            0,
            2,
            WIDTH,
            STAGES,
            TOTAL,
            VIEW_C0,
            KC,
        )
        _store_h(h_smem, _bias_relu(acc, params_ptr, 0, True, mma, WIDTH, P_BIAS))

        # layers 1..4: h -> h
        for li in gl.static_range(1, 5):
            acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
            acc = _layer(
                acc,
                h_smem,
                x_smem,
                w_ring,
                ready,
                w_desc,
                wv_desc,
                base,
                has_next,  #
                2 + 4 * (li - 1),
                4,
                0,
                WIDTH,
                STAGES,
                TOTAL,
                VIEW_C0,
                KC,
            )
            _store_h(h_smem, _bias_relu(acc, params_ptr, li, True, mma, WIDTH, P_BIAS))

        # layer 5: [h, x] -> h (the skip concat as two K ranges of one accumulation)
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(
            acc,
            h_smem,
            x_smem,
            w_ring,
            ready,
            w_desc,
            wv_desc,
            base,
            has_next,  #
            18,
            4,
            2,
            WIDTH,
            STAGES,
            TOTAL,
            VIEW_C0,
            KC,
        )
        _store_h(h_smem, _bias_relu(acc, params_ptr, 5, True, mma, WIDTH, P_BIAS))
        # x is free now (both warpgroups passed the barriers in _store_h): prefetch the next tile's
        mnext = (tile + nprog) * BM
        mbarrier.expect(x_bar.index(0), 2 * x_desc.block_type.nbytes, pred=has_next)
        tma.async_copy_global_to_shared(x_desc, [mnext, 0], x_bar.index(0), x_smem.index(0), has_next)
        tma.async_copy_global_to_shared(x_desc, [mnext, KC], x_bar.index(0), x_smem.index(1), has_next)

        # layers 6, 7
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(
            acc,
            h_smem,
            x_smem,
            w_ring,
            ready,
            w_desc,
            wv_desc,
            base,
            has_next,  #
            24,
            4,
            0,
            WIDTH,
            STAGES,
            TOTAL,
            VIEW_C0,
            KC,
        )
        _store_h(h_smem, _bias_relu(acc, params_ptr, 6, True, mma, WIDTH, P_BIAS))
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(
            acc,
            h_smem,
            x_smem,
            w_ring,
            ready,
            w_desc,
            wv_desc,
            base,
            has_next,  #
            28,
            4,
            0,
            WIDTH,
            STAGES,
            TOTAL,
            VIEW_C0,
            KC,
        )
        h7 = _bias_relu(acc, params_ptr, 7, True, mma, WIDTH, P_BIAS)

        # density head: [BM, 256] . w_d, a reduction inside each warp (warps_per_cta=[8, 1])
        wd = gl.load(params_ptr + P_WD + cols)
        dens = gl.sum(h7.to(gl.float32) * gl.expand_dims(wd, 0), axis=1) + gl.load(params_ptr + P_BD)
        dens = dens.to(gl.bfloat16).to(gl.float32)
        rows = row0 + rows_l
        gl.store(dens_ptr + rows, dens, mask=rows < N)
        _store_h(h_smem, h7)

        # bottleneck: h -> h, no activation
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(
            acc,
            h_smem,
            x_smem,
            w_ring,
            ready,
            w_desc,
            wv_desc,
            base,
            has_next,  #
            32,
            4,
            0,
            WIDTH,
            STAGES,
            TOTAL,
            VIEW_C0,
            KC,
        )
        _store_h(h_smem, _bias_relu(acc, params_ptr, 8, False, mma, WIDTH, P_BIAS))

        # view layer: bottleneck @ Wv[:, :256]^T (N = 128) + per-ray term, ReLU
        acc_v = gl.zeros([BM, VIEW], gl.float32, layout=mma_v)
        acc_v = _layer(
            acc_v,
            h_smem,
            x_smem,
            w_ring,
            ready,
            w_desc,
            wv_desc,
            base,
            has_next,  #
            VIEW_C0,
            4,
            0,
            VIEW,
            STAGES,
            TOTAL,
            VIEW_C0,
            KC,
        )
        rows_v = row0 + rows_lv
        in_v = gl.expand_dims(rows_v < N, 1)
        ray = gl.expand_dims(rows_v // S, 1)
        pr = gl.load(per_ray_ptr + ray * VIEW + gl.expand_dims(cols_v, 0), mask=in_v, other=0.0)
        v = acc_v.to(gl.bfloat16).to(gl.float32) + pr.to(gl.float32)  # bf16 + bf16 as in autocast
        v = gl.maximum(v.to(gl.bfloat16).to(gl.float32), 0.0)

        # rgb head: three row reductions
        out_mask = rows_v < N
        for c in gl.static_range(3):
            wc = gl.load(params_ptr + P_WRGB + c * VIEW + cols_v)
            rc = gl.sum(v * gl.expand_dims(wc, 0), axis=1) + gl.load(params_ptr + P_BRGB + c)
            rc = rc.to(gl.bfloat16).to(gl.float32)
            gl.store(rgb_ptr + rows_v * 3 + c, rc, mask=out_mask)
        it += 1

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    mbarrier.invalidate(x_bar.index(0))


def _layouts():
    w = gl.NVMMASharedLayout.get_default_for([WIDTH, KC], gl.bfloat16)
    # the same 128-byte swizzle: a [128, 64] box of the view weight lands bit-identical to the first half of a slot
    assert w == gl.NVMMASharedLayout.get_default_for([VIEW, KC], gl.bfloat16)
    return w, gl.NVMMASharedLayout.get_default_for([BM, KC], gl.bfloat16)


def describe(pk):
    """`fused_mlp.pack`'s dict with the TMA descriptors of its weights added (made once per set of weights)."""
    w_layout, _ = _layouts()
    return dict(
        pk,
        w_desc=TensorDescriptor.from_tensor(pk['w'], [WIDTH, KC], w_layout),
        wv_desc=TensorDescriptor.from_tensor(pk['wv_h'], [VIEW, KC], w_layout),
    )


def forward(pk, x, per_ray, samples):
    """Launch the kernel: x `[N, x_dim]` bf16 contiguous (N = rays x samples), per_ray `[rays, 128]` bf16.

    Returns raw rgb `[N, 3]` and raw density `[N]`, float32."""
    n, xd = x.shape
    rgb = torch.empty(n, 3, device=x.device, dtype=torch.float32)
    density = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return rgb, density
    _, x_layout = _layouts()
    # the second [128, 64] box of x is zero-filled past column x_dim, and rows past n are zero-filled
    x_desc = TensorDescriptor(x, [n, xd], [xd, 1], [BM, KC], x_layout)
    num_tiles = triton.cdiv(n, BM)
    grid = (min(num_tiles, torch.cuda.get_device_properties(x.device).multi_processor_count),)
    mlp_fwd_kernel[grid](
        x_desc, pk['w_desc'], pk['wv_desc'], pk['params'], per_ray, rgb, density, n, samples, num_tiles,
        BM=BM, WIDTH=WIDTH, KC=KC, VIEW=VIEW, STAGES=STAGES, TOTAL=TOTAL_CHUNKS, VIEW_C0=VIEW_C0,
        P_BIAS=P_BIAS, P_WD=P_WD, P_WRGB=P_WRGB, P_BRGB=P_BRGB, P_BD=P_BD, num_warps=NUM_WARPS,
    )  # fmt: skip
    return rgb, density


def compile_offline(arch=90):
    """Compile the kernel for sm_{arch}a without a GPU (Triton bundles ptxas); returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    w_layout, x_layout = _layouts()
    sig = {
        'x_desc': f'tensordesc<bf16[{BM}, {KC}],{x_layout!r}>',
        'w_desc': f'tensordesc<bf16[{WIDTH}, {KC}],{w_layout!r}>',
        'wv_desc': f'tensordesc<bf16[{VIEW}, {KC}],{w_layout!r}>',
        'params_ptr': '*fp32', 'per_ray_ptr': '*bf16', 'rgb_ptr': '*fp32', 'dens_ptr': '*fp32',
        'N': 'i32', 'S': 'i32', 'num_tiles': 'i32',
    }  # fmt: skip
    consts = dict(
        BM=BM, WIDTH=WIDTH, KC=KC, VIEW=VIEW, STAGES=STAGES, TOTAL=TOTAL_CHUNKS, VIEW_C0=VIEW_C0,
        P_BIAS=P_BIAS, P_WD=P_WD, P_WRGB=P_WRGB, P_BRGB=P_BRGB, P_BD=P_BD, num_warps=NUM_WARPS,
    )  # fmt: skip
    names = list(mlp_fwd_kernel.arg_names)
    sig.update({name: 'constexpr' for name in consts})
    src = GluonASTSource(mlp_fwd_kernel, {n: sig[n] for n in names}, {(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget('cuda', arch, 32), options=dict(num_warps=NUM_WARPS))
