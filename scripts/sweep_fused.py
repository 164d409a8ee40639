"""Launch configurations of the fused Triton MLP (fused_mlp.py), timed on one level's batch.

    python scripts/sweep_fused.py            # CUDA with Triton; default network, 4,096 rays x 128 samples

For each (rows per program, warps) it times the forward without stored activations
(rendering), the forward with them (training) and forward + backward, then prints a
profile of one forward + backward at the configuration in fused_mlp.LAUNCH.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused_mlp  # noqa: E402
import ray_utils  # noqa: E402
from model import MipNeRF, ModelArgs  # noqa: E402


def timed_ms(fn, n=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main():
    if not torch.cuda.is_available() or not fused_mlp.available():
        raise SystemExit('sweep_fused.py: error: needs CUDA and Triton')
    dev = torch.device('cuda')
    m = MipNeRF(ModelArgs()).to(dev).set_precision('bf16')
    m.kernels = 'triton'
    rays, samples = 4096, 128
    mean = torch.randn(rays, samples, 3, device=dev)
    cov = torch.rand(rays, samples, 3, device=dev) * 0.01
    view = ray_utils.pos_enc(torch.nn.functional.normalize(torch.randn(rays, 3, device=dev), dim=-1), 0, 4, True)
    x = ray_utils.integrated_pos_enc(mean, cov, 0, 16)

    def fwd_save():
        return fused_mlp.fused_forward(m.mlp, m.packed_weights(), x, view)

    def fwd_bwd():
        rgb, d = fwd_save()
        (rgb.sum() + d.sum()).backward()

    def fwd_render():
        with torch.no_grad():
            fused_mlp.fused_forward(m.mlp, m.packed_weights(), x, view)

    chosen = dict(fused_mlp.LAUNCH)
    print(f'{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {fused_mlp.triton.__version__}; '
          f'one level: {rays} rays x {samples} samples')
    print('| rows/program | warps | forward, render (ms) | forward, training (ms) | forward + backward (ms) |')
    print('|---:|---:|---:|---:|---:|')
    for block, warps in [(32, 4), (64, 4), (128, 8)]:
        for k in fused_mlp.LAUNCH:
            fused_mlp.LAUNCH[k] = (block, warps)
        try:
            print(f'| {block} | {warps} | {timed_ms(fwd_render):.2f} | {timed_ms(fwd_save):.2f} | '
                  f'{timed_ms(fwd_bwd):.2f} |', flush=True)
        except Exception as e:   # e.g. out of shared memory on smaller cards
            print(f'| {block} | {warps} | {type(e).__name__}: {str(e)[:80]} | | |', flush=True)
    fused_mlp.LAUNCH.update(chosen)
    from torch.profiler import ProfilerActivity, profile
    fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=10, max_name_column_width=40))


if __name__ == '__main__':
    main()
