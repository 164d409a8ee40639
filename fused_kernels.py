"""Gluon kernels for Hopper (sm_90a) behind `fused_mlp.py`: the default MLP's forward and backward.

Imported only where `fused_mlp.problem` found a Hopper GPU and Triton with Gluon. Shapes and the
packed weights are `fused_mlp`'s; measured on an H100 (2026-11-27, 4,096 rays x 128 samples):
forward 1.21 ms (2.05 ms per 1M rows with 4 stages), forward saving the activations 2.66 ms (one h
buffer; 2.19 against 2.51 ms on an H200 with two, 2026-11-28), backward kernel 2.01 ms, weight and
bias gradients of layers 1..8 1.59 ms (2026-11-28), against 12.04 ms for forward + backward of the
torch.compile'd bf16 MLP.

- `mlp_fwd_kernel`: persistent grid (min(#tiles, #SMs) CTAs, tiles pid, pid + P, ...), 8 warps = 2
  warpgroups over 128-row tiles (MMA layout warps_per_cta=[8, 1]: a row's columns in one warp, so
  the heads are row reductions without shared memory). Shared memory: h [128, 256] bf16 (the
  current activation), x as [2, 128, 64] (TMA zero-fills past its width and past N) and a ring of
  STAGES weight slots [256, 64]. The weights stream through the ring by TMA, the same 40 K chunks
  per tile, continuing across layers and tiles; per chunk: wait for the slot's mbarrier, async
  wgmma (A: a K slice of h or x, B: the slot, K-major through permute), wait until one is in
  flight, barrier, refill the previous slot. Per layer in registers: + bias, ReLU, -> bf16, stored
  over h (barriers around, fence_async_shared before the next wgmma). Layer 7's epilogue gives the
  density, the view layer adds the per-ray term (gathered by row // S), the rgb head is three row
  reductions. Inference only: nothing is saved.
- `mlp_fwd_save_kernel`: the same forward for training, which also TMA-stores each h (h_0..h_7, the
  bottleneck) into H [9 * Npad, 256] (block l at rows l * Npad) and the view output into V
  [Npad, 128]. h is double-buffered (layer l writes buffer (tile count + l) % 2), so each store has
  two layers to drain before its buffer is written again; x has no buffer of its own (no room
  left): it is TMA-loaded into the first 128 columns of the buffer that its layer writes next.
- `mlp_bwd_kernel`: the same machinery over the transposed weights (chunks of W^T, so B is K-major
  as in the forward), 34 chunks per tile: dz_view = bf16(d_rgb @ W_rgb) * (v > 0) in registers,
  then dz_b = dz_view @ Wv_h, dz_7 = (dz_b @ W_b + d_density w_d) * (h_7 > 0), and
  dz_{l-1} = (dz_l @ W_l,h) * (h_{l-1} > 0) down to dz_0; each dz is the next product's A operand
  in shared memory and is TMA-stored to DZ [9 * Npad, 256] (the bottleneck's at block 8), dz_view to
  DV. The mask tile h_{l-1} is TMA-loaded from H one product ahead into a second buffer. No
  gradient for x or cond: they come from data.
- `dw_bias_kernel` (plain Triton): the weight gradients as dz^T @ input over all rows, split into row
  ranges, with the bias column sums from the same reads of dz (`tn_sums`): blocks 1..8 in one launch,
  dz_0 and dz_5 against x in another, the view layer's dv against the bottleneck in a third, d_rgb
  (16 wide) against v in a fourth.
- `ipe_kernel`: `ray_utils.integrated_pos_enc` straight to bf16 in one pass.

Patterns from the Triton Gluon tutorials 05-wgmma.py (layouts, async wgmma and its wait, K-major B
through permute, store + fence before an async reader) and 07-persistence.py (the TMA ring with one
mbarrier per slot and phase = position // slots & 1, the persistent loop); API names as in triton
3.6.0's triton.experimental.gluon.
"""

import functools
import os

import torch
import triton
import triton.language as tl
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
from triton.tools.tensor_descriptor import TensorDescriptor as TlDescriptor  # (host side, for triton.jit kernels)

from fused_mlp import (
    BM,
    BWD_TOTAL,
    FWD_TOTAL,
    KC,
    NSAVE,
    NUM_WARPS,
    P_BD,
    P_BIAS,
    P_BRGB,
    P_WD,
    P_WRGB,
    VIEW,
    VIEW_C0,
    WIDTH,
    XK,
)

# Weight ring depths. Forward: 4 slots (229,416 B of shared memory; 2.05 ms per 1M rows on an H100
# against 2.30 with 3), 3 when saving (two h buffers + ring, 229,416 B). Backward: 3 (A + mask +
# ring, 229,416 B).
FWD_STAGES, FWD_SAVE_STAGES, BWD_STAGES = 4, 3, 3
# Weight gradients (`dw_bias_kernel`): 64-row steps, 3 stages (149,528 B), row ranges for about 128 CTAs
# (one wave; blocks 1..8: 8 ranges). H100, blocks 1..8 over 4,096 x 128 rows: 1.592 ms; 16 or 33 ranges,
# 4 stages, 32-row steps, register bias sums and pointer loads were all within 0.11 ms of it, none faster.
DW_BK, DW_STAGES, DW_CTAS = 64, 3, 128


# fmt: off
@gluon.jit
def _barriers(ready, other, STAGES: gl.constexpr, INIT: gl.constexpr):
    """Initialise (INIT, then fence for the async proxy) or invalidate the ring's STAGES mbarriers and one other."""
    for i in gl.static_range(STAGES):
        if INIT:
            mbarrier.init(ready.index(i), count=1)
        else:
            mbarrier.invalidate(ready.index(i))
    if INIT:
        mbarrier.init(other.index(0), count=1)
        fence_async_shared()
    else:
        mbarrier.invalidate(other.index(0))


@gluon.jit
def _issue_chunk(p, CID: gl.constexpr, w_desc, wv_desc, w_ring, ready, pred, STAGES: gl.constexpr,
                 VIEW_C0: gl.constexpr):
    s = p % STAGES
    bar = ready.index(s)
    if CID >= VIEW_C0:
        # view weight Wv[:, :256] ([128, 256]): box [128, 64] into the first half of the slot
        mbarrier.expect(bar, wv_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(wv_desc, [0, (CID - VIEW_C0) * 64], bar,
                                        w_ring.index(s).slice(0, 128, dim=0), pred)
    else:
        mbarrier.expect(bar, w_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(w_desc, [CID * 256, 0], bar, w_ring.index(s), pred)


@gluon.jit
def _layer(acc, a_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
           C0: gl.constexpr, NH: gl.constexpr, NX: gl.constexpr, NOUT: gl.constexpr,  #
           STAGES: gl.constexpr, TOTAL: gl.constexpr, VIEW_C0: gl.constexpr, KC: gl.constexpr):
    """acc = [a | x] @ B over the NH + NX chunks starting at schedule position C0."""
    for j in gl.static_range(NH + NX):
        g = base + (C0 + j)
        s = g % STAGES
        mbarrier.wait(ready.index(s), (g // STAGES) & 1)
        if j < NH:
            a = a_smem.slice(j * KC, KC, dim=1)
        else:
            a = x_smem.index(j - NH)
        if NOUT == 256:
            b = w_ring.index(s).permute((1, 0))
        else:
            b = w_ring.index(s).slice(0, NOUT, dim=0).permute((1, 0))
        acc = warpgroup_mma(a, b, acc, use_acc=(j > 0), is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        gl.thread_barrier()
        if C0 + j + STAGES - 1 < TOTAL:
            _issue_chunk(g + STAGES - 1, C0 + j + STAGES - 1, w_desc, wv_desc, w_ring, ready, True, STAGES, VIEW_C0)
        else:
            _issue_chunk(g + STAGES - 1, C0 + j + STAGES - 1 - TOTAL, w_desc, wv_desc, w_ring, ready, has_next,
                         STAGES, VIEW_C0)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    return acc


@gluon.jit
def _store_tile(smem, val, desc, row, WAIT: gl.constexpr, SAVE: gl.constexpr):
    """Write `val` into `smem` (the A operand of the next product) in place, and, with SAVE,
    TMA-store it to rows [row, row + 128) of `desc`'s tensor.

    store_wait(0) first: the previous TMA store from the same buffer must have finished reading it
    (only the issuing thread has bulk groups; the barrier publishes its wait to everyone).
    The barrier also orders this store after every warpgroup's wgmma_wait(0) on the old contents."""
    if WAIT:
        tma.store_wait(0)
    gl.thread_barrier()
    smem.store(val)
    fence_async_shared()  # generic-proxy writes -> visible to the async proxy (wgmma, TMA store)
    gl.thread_barrier()
    if SAVE:
        tma.async_copy_shared_to_global(desc, [row, 0], smem)


@gluon.jit
def _bias_relu(acc, params_ptr, LAYER: gl.constexpr, RELU: gl.constexpr, mma: gl.constexpr,
               WIDTH: gl.constexpr, P_BIAS: gl.constexpr):
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, mma))
    bias = gl.load(params_ptr + P_BIAS + LAYER * WIDTH + cols)
    v = acc + gl.expand_dims(bias, 0)
    if RELU:
        v = gl.maximum(v, 0.0)
    return v.to(gl.bfloat16)


@gluon.jit
def _density_head(h7, params_ptr, dens_ptr, rows, N, cols, P_WD: gl.constexpr, P_BD: gl.constexpr):
    """Raw density of the tile's rows from h_7 (bf16, the MMA layout): a row reduction, rounded to bf16."""
    wd = gl.load(params_ptr + P_WD + cols)
    dens = gl.sum(h7.to(gl.float32) * gl.expand_dims(wd, 0), axis=1) + gl.load(params_ptr + P_BD)
    dens = dens.to(gl.bfloat16).to(gl.float32)
    gl.store(dens_ptr + rows, dens, mask=rows < N)


@gluon.jit
def _view_rgb_heads(acc_v, per_ray_ptr, params_ptr, rgb_ptr, v_ptr, rows_v, N, S, cols_v, VIEW: gl.constexpr,
                    P_WRGB: gl.constexpr, P_BRGB: gl.constexpr, SAVE_V: gl.constexpr):
    """The view layer's epilogue (+ the per-ray term of row // S, ReLU, bf16; with SAVE_V also stored to
    V, rows < Npad so no mask) and the rgb head: three row reductions, rounded to bf16."""
    in_v = gl.expand_dims(rows_v < N, 1)
    ray = gl.expand_dims(rows_v // S, 1)
    pr = gl.load(per_ray_ptr + ray * VIEW + gl.expand_dims(cols_v, 0), mask=in_v, other=0.0)
    v = acc_v.to(gl.bfloat16).to(gl.float32) + pr.to(gl.float32)
    v = gl.maximum(v.to(gl.bfloat16).to(gl.float32), 0.0)
    if SAVE_V:
        gl.store(v_ptr + gl.expand_dims(rows_v, 1) * VIEW + gl.expand_dims(cols_v, 0), v.to(gl.bfloat16))
    out_mask = rows_v < N
    for c in gl.static_range(3):
        wc = gl.load(params_ptr + P_WRGB + c * VIEW + cols_v)
        rc = gl.sum(v * gl.expand_dims(wc, 0), axis=1) + gl.load(params_ptr + P_BRGB + c)
        rc = rc.to(gl.bfloat16).to(gl.float32)
        gl.store(rgb_ptr + rows_v * 3 + c, rc, mask=out_mask)


@triton.constexpr_function
def _mma_layout(n):
    """The wgmma accumulator layout of the kernels (8 warps) for an output n columns wide."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, n, 16])


@gluon.jit
def _weight_ring(w_desc, STAGES: gl.constexpr, WIDTH: gl.constexpr, KC: gl.constexpr):
    """The forward kernels' weight ring in shared memory, its barriers and x's barrier, initialized."""
    w_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, WIDTH, KC], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    _barriers(ready, x_bar, STAGES, True)
    return w_ring, ready, x_bar


@gluon.jit
def _prefetch_weights(w_desc, wv_desc, w_ring, ready, STAGES: gl.constexpr, VIEW_C0: gl.constexpr):
    """The forward kernels' prologue: the first STAGES - 1 weight chunks into the ring."""
    for c in gl.static_range(STAGES - 1):
        _issue_chunk(c, c, w_desc, wv_desc, w_ring, ready, True, STAGES, VIEW_C0)


@gluon.jit
def _tile_indices(mma: gl.constexpr, mma_v: gl.constexpr, BM: gl.constexpr, WIDTH: gl.constexpr,
                  VIEW: gl.constexpr):
    """Row and column indices of a tile in the trunk's (mma) and the view layer's (mma_v) layouts."""
    rows_l = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    rows_lv = gl.arange(0, BM, layout=gl.SliceLayout(1, mma_v))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, mma))
    cols_v = gl.arange(0, VIEW, layout=gl.SliceLayout(0, mma_v))
    return rows_l, rows_lv, cols, cols_v


# ==============================================================================================
# Forward for inference (nothing saved)
# ==============================================================================================
@gluon.jit
def mlp_fwd_kernel(x_desc, w_desc, wv_desc, h_desc, params_ptr, per_ray_ptr, rgb_ptr, dens_ptr,  #
                         N, S, num_tiles,  #
                         BM: gl.constexpr, WIDTH: gl.constexpr, KC: gl.constexpr, VIEW: gl.constexpr,
                         STAGES: gl.constexpr, TOTAL: gl.constexpr, VIEW_C0: gl.constexpr,  #
                         P_BIAS: gl.constexpr, P_WD: gl.constexpr, P_WRGB: gl.constexpr, P_BRGB: gl.constexpr,
                         P_BD: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 8)
    gl.static_assert(BM == 128)
    mma: gl.constexpr = _mma_layout(WIDTH)
    mma_v: gl.constexpr = _mma_layout(VIEW)

    h_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, WIDTH], h_desc.layout)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BM, KC], x_desc.layout)
    w_ring, ready, x_bar = _weight_ring(w_desc, STAGES, WIDTH, KC)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    mbarrier.expect(x_bar.index(0), 2 * x_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [pid * BM, 0], x_bar.index(0), x_smem.index(0))
    tma.async_copy_global_to_shared(x_desc, [pid * BM, KC], x_bar.index(0), x_smem.index(1))
    _prefetch_weights(w_desc, wv_desc, w_ring, ready, STAGES, VIEW_C0)
    rows_l, rows_lv, cols, cols_v = _tile_indices(mma, mma_v, BM, WIDTH, VIEW)

    it = 0
    for tile in range(pid, num_tiles, nprog):
        base = it * TOTAL
        row0 = tile * BM
        has_next = tile + nprog < num_tiles

        mbarrier.wait(x_bar.index(0), it & 1)

        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, h_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     0, 0, 2, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        _store_tile(h_smem, _bias_relu(acc, params_ptr, 0, True, mma, WIDTH, P_BIAS), h_desc, row0, False, False)

        for li in gl.static_range(1, 5):
            acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
            acc = _layer(acc, h_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                         2 + 4 * (li - 1), 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
            _store_tile(h_smem, _bias_relu(acc, params_ptr, li, True, mma, WIDTH, P_BIAS), h_desc, row0, False, False)

        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, h_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     18, 4, 2, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        _store_tile(h_smem, _bias_relu(acc, params_ptr, 5, True, mma, WIDTH, P_BIAS), h_desc, row0, False, False)
        mnext = (tile + nprog) * BM
        mbarrier.expect(x_bar.index(0), 2 * x_desc.block_type.nbytes, pred=has_next)
        tma.async_copy_global_to_shared(x_desc, [mnext, 0], x_bar.index(0), x_smem.index(0), has_next)
        tma.async_copy_global_to_shared(x_desc, [mnext, KC], x_bar.index(0), x_smem.index(1), has_next)

        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, h_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     24, 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        _store_tile(h_smem, _bias_relu(acc, params_ptr, 6, True, mma, WIDTH, P_BIAS), h_desc, row0, False, False)
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, h_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     28, 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        h7 = _bias_relu(acc, params_ptr, 7, True, mma, WIDTH, P_BIAS)

        _density_head(h7, params_ptr, dens_ptr, row0 + rows_l, N, cols, P_WD, P_BD)
        _store_tile(h_smem, h7, h_desc, row0, False, False)

        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, h_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     32, 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        _store_tile(h_smem, _bias_relu(acc, params_ptr, 8, False, mma, WIDTH, P_BIAS), h_desc, row0, False, False)

        acc_v = gl.zeros([BM, VIEW], gl.float32, layout=mma_v)
        acc_v = _layer(acc_v, h_smem, x_smem, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                       VIEW_C0, 4, 0, VIEW, STAGES, TOTAL, VIEW_C0, KC)
        _view_rgb_heads(acc_v, per_ray_ptr, params_ptr, rgb_ptr, None, row0 + rows_lv, N, S, cols_v, VIEW,
                        P_WRGB, P_BRGB, False)
        it += 1

    _barriers(ready, x_bar, STAGES, False)


# ==============================================================================================
# Forward for training (saves the activations), double-buffered: h_l is written into hb[(it + l) % 2]
# (it: the CTA's tile count), so a TMA store has two layers (not one) to read its buffer before it is
# overwritten: store_wait(1) instead of store_wait(0). Shared memory: hb 2 x 64 KB + ring 3 x 32 KB =
# 224 KB, no room for x: x is TMA-loaded into the first 128 columns of the h buffer that the layer
# reading it writes next (h_0's for layer 0, h_5's for layer 5), once the TMA store of that buffer's
# previous h is done. Per tile, stores s = 0..8 (h_0..h_7, the bottleneck) alternate buffers, and 9
# is odd: the parity flips per tile, hence (it + l) % 2.
# ==============================================================================================
@gluon.jit
def _load_x_into(x_desc, x_bar, dst, row, pred):
    """x rows [row, row + 128) (both 64-column boxes, zero-filled past N and x_dim) into columns 0..127 of `dst`.

    The caller has made sure (store_wait + barrier) that no TMA store still reads `dst`."""
    mbarrier.expect(x_bar.index(0), 2 * x_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(x_desc, [row, 0], x_bar.index(0), dst.slice(0, 64, dim=1), pred)
    tma.async_copy_global_to_shared(x_desc, [row, 64], x_bar.index(0), dst.slice(64, 64, dim=1), pred)


@gluon.jit
def _store_tile_db(smem, val, desc, row):
    """`_store_tile` for the double buffer: the store that last read `smem` is the one before the most
    recent (the most recent read the other buffer), so store_wait(1) lets the most recent go on."""
    tma.store_wait(1)
    gl.thread_barrier()
    smem.store(val)
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(desc, [row, 0], smem)


@gluon.jit
def mlp_fwd_save_kernel(x_desc, w_desc, wv_desc, h_desc, params_ptr, per_ray_ptr, rgb_ptr, dens_ptr, v_ptr,  #
                           N, S, num_tiles, Npad,  #
                           BM: gl.constexpr, WIDTH: gl.constexpr, KC: gl.constexpr, VIEW: gl.constexpr,
                           STAGES: gl.constexpr, TOTAL: gl.constexpr, VIEW_C0: gl.constexpr,  #
                           P_BIAS: gl.constexpr, P_WD: gl.constexpr, P_WRGB: gl.constexpr, P_BRGB: gl.constexpr,
                           P_BD: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 8)
    gl.static_assert(BM == 128)
    gl.static_assert(KC == 64)
    mma: gl.constexpr = _mma_layout(WIDTH)
    mma_v: gl.constexpr = _mma_layout(VIEW)

    hb = gl.allocate_shared_memory(gl.bfloat16, [2, BM, WIDTH], h_desc.layout)
    w_ring, ready, x_bar = _weight_ring(w_desc, STAGES, WIDTH, KC)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    # x of the first tile into hb[0] (it = 0: h_0 goes there); two x loads per tile: phases 0 then 1
    _load_x_into(x_desc, x_bar, hb.index(0), pid * BM, True)
    _prefetch_weights(w_desc, wv_desc, w_ring, ready, STAGES, VIEW_C0)
    rows_l, rows_lv, cols, cols_v = _tile_indices(mma, mma_v, BM, WIDTH, VIEW)

    it = 0
    for tile in range(pid, num_tiles, nprog):
        base = it * TOTAL
        row0 = tile * BM
        has_next = tile + nprog < num_tiles
        par = it % 2  # h_l goes to hb[(par + l) % 2]
        hp = hb.index(par)  # h_0, h_2, h_4, h_6, the bottleneck
        hq = hb.index(1 - par)  # h_1, h_3, h_5, h_7

        # L0: A = x, in hp's first 128 columns (loaded during the previous tile's view layer)
        mbarrier.wait(x_bar.index(0), 0)
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, hp, hp, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     0, 2, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        _store_tile_db(hp, _bias_relu(acc, params_ptr, 0, True, mma, WIDTH, P_BIAS), h_desc, row0)

        for li in gl.static_range(1, 5):
            if li % 2 == 1:
                src_buf = hp
                dst_buf = hq
            else:
                src_buf = hq
                dst_buf = hp
            acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
            acc = _layer(acc, src_buf, src_buf, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                         2 + 4 * (li - 1), 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
            _store_tile_db(dst_buf, _bias_relu(acc, params_ptr, li, True, mma, WIDTH, P_BIAS), h_desc,
                           li * Npad + row0)

        # L5 reads h_4 (hp) and x; x goes into hq (h_3's buffer, h_5's next) once h_3's store is done
        # (h_4's, the most recent, may go on), and arrives while the 4 h chunks run.
        tma.store_wait(1)
        gl.thread_barrier()
        _load_x_into(x_desc, x_bar, hq, row0, True)
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer5_db(acc, hp, hq, x_bar, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                         STAGES, TOTAL, VIEW_C0, KC)
        _store_tile_db(hq, _bias_relu(acc, params_ptr, 5, True, mma, WIDTH, P_BIAS), h_desc, 5 * Npad + row0)

        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, hq, hq, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     24, 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        _store_tile_db(hp, _bias_relu(acc, params_ptr, 6, True, mma, WIDTH, P_BIAS), h_desc, 6 * Npad + row0)
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, hp, hp, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     28, 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        h7 = _bias_relu(acc, params_ptr, 7, True, mma, WIDTH, P_BIAS)

        _density_head(h7, params_ptr, dens_ptr, row0 + rows_l, N, cols, P_WD, P_BD)
        _store_tile_db(hq, h7, h_desc, 7 * Npad + row0)

        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, hq, hq, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                     32, 4, 0, WIDTH, STAGES, TOTAL, VIEW_C0, KC)
        _store_tile_db(hp, _bias_relu(acc, params_ptr, 8, False, mma, WIDTH, P_BIAS), h_desc, 8 * Npad + row0)

        # the next tile's x into hq (its h_0 buffer: the next tile's parity is 1 - par) once h_7's store
        # is done (the bottleneck's may go on); it arrives during the view layer, which reads hp
        tma.store_wait(1)
        gl.thread_barrier()
        _load_x_into(x_desc, x_bar, hq, (tile + nprog) * BM, has_next)

        acc_v = gl.zeros([BM, VIEW], gl.float32, layout=mma_v)
        acc_v = _layer(acc_v, hp, hp, w_ring, ready, w_desc, wv_desc, base, has_next,  #
                       VIEW_C0, 4, 0, VIEW, STAGES, TOTAL, VIEW_C0, KC)
        _view_rgb_heads(acc_v, per_ray_ptr, params_ptr, rgb_ptr, v_ptr, row0 + rows_lv, N, S, cols_v, VIEW,
                        P_WRGB, P_BRGB, True)
        it += 1

    tma.store_wait(0)
    _barriers(ready, x_bar, STAGES, False)


@gluon.jit
def _layer5_db(acc, h_smem, x_smem, x_bar, w_ring, ready, w_desc, wv_desc, base, has_next,  #
               STAGES: gl.constexpr, TOTAL: gl.constexpr, VIEW_C0: gl.constexpr, KC: gl.constexpr):
    """Layer 5 of the double-buffered forward: the 4 h chunks (schedule 18..21) from `h_smem`, then
    (once x has arrived, phase 1) the 2 x chunks (22, 23) from columns 0..127 of `x_smem`."""
    for j in gl.static_range(6):
        g = base + (18 + j)
        s = g % STAGES
        mbarrier.wait(ready.index(s), (g // STAGES) & 1)
        if j < 4:
            a = h_smem.slice(j * KC, KC, dim=1)
        else:
            if j == 4:
                mbarrier.wait(x_bar.index(0), 1)
            a = x_smem.slice((j - 4) * KC, KC, dim=1)
        acc = warpgroup_mma(a, w_ring.index(s).permute((1, 0)), acc, use_acc=(j > 0), is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        gl.thread_barrier()
        _issue_chunk(g + STAGES - 1, 18 + j + STAGES - 1, w_desc, wv_desc, w_ring, ready, True, STAGES, VIEW_C0)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    return acc


# ==============================================================================================
# Backward: pre-activation gradients of every layer
# ==============================================================================================
@gluon.jit
def _mask_next(acc, m_smem, m_bar, phase, h_desc, a_smem, dz_desc, dz_row, next_row, pred, mma: gl.constexpr):
    """dz = bf16(acc) * (h > 0) with h the tile in M; store dz (A buffer + TMA to DZ); then refill M
    with the tile at `next_row` of H (pred)."""
    mbarrier.wait(m_bar.index(0), phase)
    hm = m_smem.load(mma)
    dz = gl.where(hm.to(gl.float32) > 0.0, acc, 0.0).to(gl.bfloat16)
    # the barriers + fence inside _store_tile also order every thread's reads of M before the TMA
    # that overwrites it
    _store_tile(a_smem, dz, dz_desc, dz_row, True, True)
    mbarrier.expect(m_bar.index(0), h_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(h_desc, [next_row, 0], m_bar.index(0), m_smem, pred)


@gluon.jit
def mlp_bwd_kernel(wt_desc, h_desc, dz_desc, params_ptr, v_ptr, drgb_ptr, ddens_ptr, dv_ptr,  #
                         N, num_tiles, Npad,  #
                         BM: gl.constexpr, WIDTH: gl.constexpr, KC: gl.constexpr, VIEW: gl.constexpr,
                         STAGES: gl.constexpr, TOTAL: gl.constexpr,  #
                         P_WD: gl.constexpr, P_WRGB: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 8)
    gl.static_assert(BM == 128)
    gl.static_assert(TOTAL == 34)
    mma: gl.constexpr = _mma_layout(WIDTH)
    a_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, WIDTH], dz_desc.layout)  # A operand: dz
    m_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, WIDTH], h_desc.layout)  # mask tile h_{l-1}
    w_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, WIDTH, KC], wt_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    m_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    _barriers(ready, m_bar, STAGES, True)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    # prologue: first STAGES-1 weight chunks, and the h7 tile of this CTA's first tile
    for c in gl.static_range(STAGES - 1):
        _issue_chunk(c, c, wt_desc, wt_desc, w_ring, ready, True, STAGES, TOTAL)
    mbarrier.expect(m_bar.index(0), h_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(h_desc, [7 * Npad + pid * BM, 0], m_bar.index(0), m_smem)

    rows_l = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, mma))
    cols2 = gl.expand_dims(cols, 0)
    cmask = cols2 < VIEW

    it = 0
    for tile in range(pid, num_tiles, nprog):
        base = it * TOTAL
        row0 = tile * BM
        has_next = tile + nprog < num_tiles
        rows = row0 + rows_l
        rmask = rows < N
        rows2 = gl.expand_dims(rows, 1)

        # ---- dz_view = bf16(bf16(d_rgb) @ W_rgb) * (v > 0), in the 256-wide layout, cols >= 128 zero
        g = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        for c in gl.static_range(3):
            dr = gl.load(drgb_ptr + rows * 3 + c, mask=rmask, other=0.0).to(gl.bfloat16).to(gl.float32)
            wc = gl.load(params_ptr + P_WRGB + c * VIEW + cols, mask=cols < VIEW, other=0.0)
            g = g + gl.expand_dims(dr, 1) * gl.expand_dims(wc, 0)
        vv = gl.load(v_ptr + rows2 * VIEW + cols2, mask=cmask, other=0.0)
        dzv = gl.where(vv.to(gl.float32) > 0.0, g.to(gl.bfloat16).to(gl.float32), 0.0).to(gl.bfloat16)
        gl.store(dv_ptr + rows2 * VIEW + cols2, dzv, mask=cmask)
        _store_tile(a_smem, dzv, dz_desc, 0, True, False)

        # ---- P0: dz_b = bf16(dz_view @ Wv[:, :256]) (K = 128: chunks 0, 1), no activation
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, a_smem, a_smem, w_ring, ready, wt_desc, wt_desc, base, has_next,  #
                     0, 2, 0, WIDTH, STAGES, TOTAL, TOTAL, KC)
        _store_tile(a_smem, acc.to(gl.bfloat16), dz_desc, 8 * Npad + row0, True, True)

        # ---- P1: dh7 = dz_b @ W_b + bf16(d_dens) w_d; dz7 = bf16(dh7) * (h7 > 0)
        acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
        acc = _layer(acc, a_smem, a_smem, w_ring, ready, wt_desc, wt_desc, base, has_next,  #
                     2, 4, 0, WIDTH, STAGES, TOTAL, TOTAL, KC)
        dd = gl.load(ddens_ptr + rows, mask=rmask, other=0.0).to(gl.bfloat16).to(gl.float32)
        wd = gl.load(params_ptr + P_WD + cols)
        acc = acc + gl.expand_dims(dd, 1) * gl.expand_dims(wd, 0)
        _mask_next(acc, m_smem, m_bar, 0, h_desc, a_smem, dz_desc, 7 * Npad + row0, 6 * Npad + row0, True, mma)

        # ---- P2..P8: layer l = 7..1: dz_{l-1} = bf16(dz_l @ W_l[:, :256]) * (h_{l-1} > 0)
        for k in gl.static_range(7):
            acc = gl.zeros([BM, WIDTH], gl.float32, layout=mma)
            acc = _layer(acc, a_smem, a_smem, w_ring, ready, wt_desc, wt_desc, base, has_next,  #
                         6 + 4 * k, 4, 0, WIDTH, STAGES, TOTAL, TOTAL, KC)
            if k < 6:  # next mask: h_{l-2} of this tile
                _mask_next(acc, m_smem, m_bar, (k + 1) & 1, h_desc, a_smem, dz_desc, (6 - k) * Npad + row0,
                           (5 - k) * Npad + row0, True, mma)
            else:  # dz_0; next mask: h7 of the next tile
                _mask_next(acc, m_smem, m_bar, (k + 1) & 1, h_desc, a_smem, dz_desc, row0,
                           7 * Npad + (tile + nprog) * BM, has_next, mma)
        it += 1

    tma.store_wait(0)
    _barriers(ready, m_bar, STAGES, False)

# fmt: on


@triton.jit
def _dw_step(a_desc, b_desc, a_row, b_row, col, acc, sacc, ones, INTERPRETED: tl.constexpr):
    """One BK-row step of `dw_bias_kernel`: acc += a^T @ b, sacc += a^T @ ones."""
    a = a_desc.load([a_row, col])  # [BK, HALF]
    b = b_desc.load([b_row, 0])  # [BK, KW]
    if INTERPRETED:  # triton 3.6's interpreter gets bf16 tl.dot wrong: widen first (exact)
        at = tl.trans(a.to(tl.float32))
        acc = tl.dot(at, b.to(tl.float32), acc, input_precision='ieee')
        sacc = tl.dot(at, ones.to(tl.float32), sacc, input_precision='ieee')
    else:
        at = tl.trans(a)
        acc = tl.dot(at, b, acc)
        sacc = tl.dot(at, ones, sacc)
    return acc, sacc


@triton.jit
def dw_bias_kernel(
    a_desc,
    b_desc,
    dw_ptr,
    db_ptr,
    a_base,
    a_step,
    b_base,
    b_step,
    nsteps,
    split,
    BK: tl.constexpr,
    HALF: tl.constexpr,
    KW: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Partial transposed products and column sums over one row range, reading each A tile once (`tn_sums`):
    job j's a = A[a_base + j * a_step + rows], b = B[b_base + j * b_step + rows];
    dw[s, j] = a^T @ b `[M, KW]`, db[s, j] = a.sum(0) `[M]` (M = programs along axis 0 x HALF).

    Grid (M / HALF, jobs, split): which HALF of a's features (fastest, so the CTAs reading the same b rows
    run together), job, row range s = whole BK-row steps [s * nsteps // split, (s + 1) * nsteps // split).
    Per step: a tile [BK, HALF], b tile [BK, KW] (TMA; columns past a tensor's width and rows past its end
    zero-filled), acc += a^T @ b on the tensor cores, and the column sums as sacc += a^T @ ones[BK, 16]
    (exact bf16 ones, float32 accumulation, no register copy of a). INTERPRETED (under TRITON_INTERPRET=1
    only): the steps run in a while loop, as triton 3.6's interpreter cannot take a range() whose bounds
    are run-time values under numpy 2, and `_dw_step` widens the operands to float32."""
    m = tl.program_id(0)
    job = tl.program_id(1)
    s = tl.program_id(2)
    k0 = (s * nsteps // split) * BK
    k1 = ((s + 1) * nsteps // split) * BK
    a_row = a_base + job * a_step + k0
    b_row = b_base + job * b_step + k0
    acc = tl.zeros([HALF, KW], dtype=tl.float32)
    sacc = tl.zeros([HALF, 16], dtype=tl.float32)
    ones = tl.full([BK, 16], 1.0, tl.float32).to(tl.bfloat16)
    if INTERPRETED:
        k = 0
        while k < k1 - k0:
            acc, sacc = _dw_step(a_desc, b_desc, a_row + k, b_row + k, m * HALF, acc, sacc, ones, True)
            k += BK
    else:
        for k in range(0, k1 - k0, BK):  # (a for loop: the pipeliner keeps the loads STAGES - 1 steps ahead)
            acc, sacc = _dw_step(a_desc, b_desc, a_row + k, b_row + k, m * HALF, acc, sacc, ones, False)
    db = tl.sum(tl.where((tl.arange(0, 16) == 0)[None, :], sacc, 0.0), axis=1)  # 16 equal columns: the first
    M = tl.num_programs(0) * HALF
    part = s * tl.num_programs(1) + job
    ri = m * HALF + tl.arange(0, HALF)
    tl.store(dw_ptr + (part * M + ri).to(tl.int64)[:, None] * KW + tl.arange(0, KW)[None, :], acc)
    tl.store(db_ptr + part * M + ri, db)


@functools.cache  # (asked by every forward and backward call of a step)
def _layouts():
    w = gl.NVMMASharedLayout.get_default_for([WIDTH, KC], gl.bfloat16)
    # the same 128-byte swizzle: a [128, 64] box of the view weight lands bit-identical to the first half of a slot
    assert w == gl.NVMMASharedLayout.get_default_for([VIEW, KC], gl.bfloat16)
    x = gl.NVMMASharedLayout.get_default_for([BM, KC], gl.bfloat16)
    return w, x, gl.NVMMASharedLayout.get_default_for([BM, WIDTH], gl.bfloat16)


def describe(pk):
    """`fused_mlp.pack`'s dict with the TMA descriptors of its weights added (made once per weight buffer)."""
    w_layout, _, _ = _layouts()
    return dict(
        pk,
        w_desc=TensorDescriptor.from_tensor(pk['w'], [WIDTH, KC], w_layout),
        wv_desc=TensorDescriptor.from_tensor(pk['wv_h'], [VIEW, KC], w_layout),
        wt_desc=TensorDescriptor.from_tensor(pk['wt'], [WIDTH, KC], w_layout),
    )


def _grid(num_tiles, device):
    return (min(num_tiles, torch.cuda.get_device_properties(device).multi_processor_count),)


def forward(pk, x, per_ray, samples, save=False):
    """The MLP on x `[N, x_dim]` bf16 contiguous (N = rays x samples, N > 0), per_ray `[rays, 128]` bf16.

    Returns raw rgb `[N, 3]` and raw density `[N]` float32; with `save` also the activations H
    `[9 * Npad, 256]` and V `[Npad, 128]` bf16 for `backward` (Npad: N rounded up to 128)."""
    n, xd = x.shape
    dev = x.device
    num_tiles = triton.cdiv(n, BM)
    npad = num_tiles * BM
    rgb = torch.empty(n, 3, device=dev, dtype=torch.float32)
    density = torch.empty(n, device=dev, dtype=torch.float32)
    # (the inference kernel only takes H's layout from its descriptor, and never touches V)
    H = torch.empty(NSAVE * npad if save else BM, WIDTH, device=dev, dtype=torch.bfloat16)
    V = torch.empty(npad, VIEW, device=dev, dtype=torch.bfloat16) if save else None
    _, x_layout, h_layout = _layouts()
    # the second [128, 64] box of x is zero-filled past column x_dim, and rows past n are zero-filled
    x_desc = TensorDescriptor(x, [n, xd], [xd, 1], [BM, KC], x_layout)
    h_desc = TensorDescriptor.from_tensor(H, [BM, WIDTH], h_layout)
    shared = dict(
        BM=BM, WIDTH=WIDTH, KC=KC, VIEW=VIEW, TOTAL=FWD_TOTAL, VIEW_C0=VIEW_C0, P_BIAS=P_BIAS, P_WD=P_WD,
        P_WRGB=P_WRGB, P_BRGB=P_BRGB, P_BD=P_BD, num_warps=NUM_WARPS,
    )  # fmt: skip
    grid = _grid(num_tiles, dev)
    if save:
        mlp_fwd_save_kernel[grid](
            x_desc, pk['w_desc'], pk['wv_desc'], h_desc, pk['params'], per_ray, rgb, density, V, n, samples,
            num_tiles, npad, STAGES=FWD_SAVE_STAGES, **shared,
        )  # fmt: skip
        return rgb, density, H, V
    mlp_fwd_kernel[grid](
        x_desc, pk['w_desc'], pk['wv_desc'], h_desc, pk['params'], per_ray, rgb, density, n, samples, num_tiles,
        STAGES=FWD_STAGES, **shared,
    )  # fmt: skip
    return rgb, density


def backward(pk, H, V, d_rgb, d_density, n):
    """The pre-activation gradients of every layer, from `forward`'s H, V and the upstream gradients
    d_rgb `[n, 3]`, d_density `[n]` float32 contiguous: DZ `[9 * Npad, 256]` (dz_0..dz_7, the
    bottleneck's) and DV `[Npad, 128]` (the view layer's), bf16; rows n.. of both are zero."""
    num_tiles = triton.cdiv(n, BM)
    npad = num_tiles * BM
    DZ = torch.empty(NSAVE * npad, WIDTH, device=H.device, dtype=torch.bfloat16)
    DV = torch.empty(npad, VIEW, device=H.device, dtype=torch.bfloat16)
    _, _, h_layout = _layouts()
    h_desc = TensorDescriptor.from_tensor(H, [BM, WIDTH], h_layout)
    dz_desc = TensorDescriptor.from_tensor(DZ, [BM, WIDTH], h_layout)
    mlp_bwd_kernel[_grid(num_tiles, H.device)](
        pk['wt_desc'], h_desc, dz_desc, pk['params'], V, d_rgb, d_density, DV, n, num_tiles, npad,
        BM=BM, WIDTH=WIDTH, KC=KC, VIEW=VIEW, STAGES=BWD_STAGES, TOTAL=BWD_TOTAL, P_WD=P_WD, P_WRGB=P_WRGB,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return DZ, DV


def _progression(rows):
    """(first, step) of an arithmetic progression of row offsets."""
    step = rows[1] - rows[0] if len(rows) > 1 else 0
    assert all(r == rows[0] + j * step for j, r in enumerate(rows)), rows
    return rows[0], step


def tn_sums(A, B, a_rows, b_rows, rows):
    """`fused_mlp.tn_sums` in one kernel (the same contract, each a read once): A `[*, M]`, B `[*, K]` bf16
    contiguous (M a multiple of 128 or a power of 2 from 16 to 128; K at most 256; rows a multiple of DW_BK;
    a_rows and b_rows arithmetic progressions) -> dW `[jobs, M, K]`, db `[jobs, M]` float32. Split-K over row ranges
    (about DW_CTAS programs in all), the partials summed here."""
    M, K = A.shape[1], B.shape[1]
    half = min(M, 2 * KC)
    kw = triton.next_power_of_2(K)
    jobs = len(a_rows)
    nsteps = rows // DW_BK
    split = max(1, min(nsteps, DW_CTAS // (M // half * jobs)))
    dw = torch.empty(split, jobs, M, kw, device=A.device, dtype=torch.float32)
    db = torch.empty(split, jobs, M, device=A.device, dtype=torch.float32)
    dw_bias_kernel[(M // half, jobs, split)](
        TlDescriptor.from_tensor(A, [DW_BK, half]), TlDescriptor.from_tensor(B, [DW_BK, kw]), dw, db,
        *_progression(a_rows), *_progression(b_rows), nsteps, split, BK=DW_BK, HALF=half, KW=kw,
        INTERPRETED=_interpreted(), num_warps=NUM_WARPS, num_stages=DW_STAGES,
    )  # fmt: skip
    return dw.sum(0)[..., :K], db.sum(0)


def _interpreted():
    return os.environ.get('TRITON_INTERPRET') == '1'


def compile_offline(which='fwd', save=False, arch=90):
    """Compile `mlp_fwd_kernel` ('fwd'), `mlp_fwd_save_kernel` ('fwd' with `save`), `mlp_bwd_kernel`
    ('bwd'), `dw_bias_kernel` ('dw': against 256-wide h; 'dwx': against x; 'dwrgb': d_rgb against v) or `ipe_kernel`
    ('ipe', 16 degrees) for sm_{arch}a without a GPU (Triton bundles ptxas); returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if which.startswith('dw'):  # (a of 256-wide dz and 128-wide dv as `tn_sums` launches them; of d_rgb 16 wide)
        half, kw = dict(dw=(2 * KC, WIDTH), dwx=(2 * KC, XK), dwrgb=(16, VIEW))[which]
        return _compile_dw_offline(GPUTarget('cuda', arch, 32), half, kw)
    if which == 'ipe':
        sig = {'mean_ptr': '*fp32', 'var_ptr': '*fp32', 'out_ptr': '*bf16', 'n': 'i32'}
        consts = dict(MIN_DEG=0, DEGS=16, BLOCK=IPE_BLOCK, INTERPRETED=False)
        sig.update({k: 'constexpr' for k in consts})
        src = triton.compiler.ASTSource(
            fn=ipe_kernel, signature={k: sig[k] for k in ipe_kernel.arg_names}, constexprs=consts
        )
        return triton.compile(src, target=GPUTarget('cuda', arch, 32), options=dict(num_warps=4))

    w_layout, x_layout, h_layout = _layouts()

    def desc(rows, cols, layout):
        return f'tensordesc<bf16[{rows}, {cols}],{layout!r}>'

    if which == 'fwd':
        kernel, sig = (mlp_fwd_save_kernel if save else mlp_fwd_kernel), {
            'x_desc': desc(BM, KC, x_layout), 'w_desc': desc(WIDTH, KC, w_layout),
            'wv_desc': desc(VIEW, KC, w_layout), 'h_desc': desc(BM, WIDTH, h_layout),
            'params_ptr': '*fp32', 'per_ray_ptr': '*bf16', 'rgb_ptr': '*fp32', 'dens_ptr': '*fp32',
            'v_ptr': '*bf16', 'N': 'i32', 'S': 'i32', 'num_tiles': 'i32', 'Npad': 'i32',
        }  # fmt: skip
        consts = dict(
            BM=BM, WIDTH=WIDTH, KC=KC, VIEW=VIEW, STAGES=FWD_SAVE_STAGES if save else FWD_STAGES, TOTAL=FWD_TOTAL,
            VIEW_C0=VIEW_C0, P_BIAS=P_BIAS, P_WD=P_WD, P_WRGB=P_WRGB, P_BRGB=P_BRGB, P_BD=P_BD, num_warps=NUM_WARPS,
        )  # fmt: skip
    else:
        kernel, sig = mlp_bwd_kernel, {
            'wt_desc': desc(WIDTH, KC, w_layout), 'h_desc': desc(BM, WIDTH, h_layout),
            'dz_desc': desc(BM, WIDTH, h_layout), 'params_ptr': '*fp32', 'v_ptr': '*bf16', 'drgb_ptr': '*fp32',
            'ddens_ptr': '*fp32', 'dv_ptr': '*bf16', 'N': 'i32', 'num_tiles': 'i32', 'Npad': 'i32',
        }  # fmt: skip
        consts = dict(
            BM=BM, WIDTH=WIDTH, KC=KC, VIEW=VIEW, STAGES=BWD_STAGES, TOTAL=BWD_TOTAL, P_WD=P_WD, P_WRGB=P_WRGB,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    names = list(kernel.arg_names)
    sig.update({name: 'constexpr' for name in consts})
    src = GluonASTSource(kernel, {n: sig[n] for n in names}, {(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget('cuda', arch, 32), options=dict(num_warps=NUM_WARPS))


def _compile_dw_offline(target, half, kw):
    sig = {
        'a_desc': f'tensordesc<bf16[{DW_BK}, {half}]>', 'b_desc': f'tensordesc<bf16[{DW_BK}, {kw}]>',
        'dw_ptr': '*fp32', 'db_ptr': '*fp32', 'a_base': 'i32', 'a_step': 'i32', 'b_base': 'i32', 'b_step': 'i32',
        'nsteps': 'i32', 'split': 'i32',
    }  # fmt: skip
    consts = dict(BK=DW_BK, HALF=half, KW=kw, INTERPRETED=False)
    sig.update({k: 'constexpr' for k in consts})
    names = list(dw_bias_kernel.arg_names)
    # as the launcher specializes them at the real sizes: pointers 16-byte aligned, row offsets and nsteps
    # multiples of 16
    div16 = ('dw_ptr', 'db_ptr', 'a_base', 'a_step', 'b_step', 'nsteps')
    attrs = {(names.index(k),): [['tt.divisibility', 16]] for k in div16}
    src = triton.compiler.ASTSource(
        fn=dw_bias_kernel, signature={k: sig[k] for k in names}, constexprs=consts, attrs=attrs
    )
    return triton.compile(src, target=target, options=dict(num_warps=NUM_WARPS, num_stages=DW_STAGES))


# 2 pi in three parts (Cody-Waite): k times the first two is exact for |k| < 2^16 whole turns, i.e. for
# |mean| * 2^(max_deg - 1) < 4e5 (|mean| < 12 at the default 16 degrees); beyond, the error grows slowly.
TWO_PI_A = tl.constexpr(6.28125)
TWO_PI_B = tl.constexpr(0.0019350051879882812)
TWO_PI_C = tl.constexpr(3.019916050561733e-07)
IPE_BLOCK = 64  # Gaussians per program (128 measured slower: 52.6 against 50.2 us)


@triton.jit
def ipe_kernel(
    mean_ptr,
    var_ptr,
    out_ptr,
    n,
    MIN_DEG: tl.constexpr,
    DEGS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """`ray_utils.integrated_pos_enc` of `[n, 3]` means and variances into `[n, 6 * DEGS]` bf16, one pass.

    The sines' arguments are reduced to [-pi, pi] (whole turns taken off in three parts), then the GPU's
    sin.approx / cos.approx (absolute error 2^-20.9 there) give them: 50 us per 524,288 Gaussians on an
    H100 against 224 us with libdevice's sin and cos, within the bf16 rounding of the float64 values
    (misc/benchmarks.md, eighth session). Triton's interpreter, which has no inline PTX, takes tl.sin."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, 64)  # feature (degree l, coordinate d) = (j // 3, j % 3), 3 * DEGS <= 64 of them
    ok = (rows < n)[:, None] & (j < 3 * DEGS)[None, :]
    src = rows[:, None] * 3 + (j % 3)[None, :]
    scale = tl.exp2((MIN_DEG + j // 3).to(tl.float32))[None, :]  # exact powers of two
    y = tl.load(mean_ptr + src, mask=ok, other=0.0) * scale
    turns = tl.floor(y * 0.15915494309189535 + 0.5)  # the nearest whole turn
    r = tl.fma(-turns, TWO_PI_C, tl.fma(-turns, TWO_PI_B, tl.fma(-turns, TWO_PI_A, y)))
    if INTERPRETED:
        sin_r, cos_r = tl.sin(r), tl.cos(r)
    else:
        sin_r = tl.inline_asm_elementwise('sin.approx.f32 $0, $1;', '=r,r', [r], tl.float32, True, 1)
        cos_r = tl.inline_asm_elementwise('cos.approx.f32 $0, $1;', '=r,r', [r], tl.float32, True, 1)
    damp = tl.exp(-0.5 * (tl.load(var_ptr + src, mask=ok, other=0.0) * (scale * scale)))
    dst = out_ptr + rows[:, None] * (6 * DEGS) + j[None, :]
    tl.store(dst, (damp * sin_r).to(tl.bfloat16), mask=ok)
    tl.store(dst + 3 * DEGS, (damp * cos_r).to(tl.bfloat16), mask=ok)


def integrated_pos_enc(mean, var, min_deg, max_deg):
    """mean, var `[N, 3]` float32 (CUDA) -> `[N, 6 * (max_deg - min_deg)]` bf16, the sin block then the cos block."""
    n, degs = mean.shape[0], max_deg - min_deg
    out = torch.empty(n, 6 * degs, device=mean.device, dtype=torch.bfloat16)
    if n:
        ipe_kernel[(triton.cdiv(n, IPE_BLOCK),)](
            mean.contiguous(),
            var.contiguous(),
            out,
            n,
            MIN_DEG=min_deg,
            DEGS=degs,
            BLOCK=IPE_BLOCK,
            INTERPRETED=_interpreted(),
        )
    return out
