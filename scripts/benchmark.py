"""Speed benchmark: training throughput, rendering and mesh-grid time, peak memory.

    python scripts/benchmark.py                                    # GPU, default network, synthetic 800x800 data
    python scripts/benchmark.py --base_dir data/nerf_synthetic/lego --variants fp32,tf32,bf16,bf16+compile,bf16+triton
    python scripts/benchmark.py --quick --device cpu               # small sizes: a smoke test for CI

For each variant (a precision, then optionally +compile for torch.compile of
the PyTorch MLP or +triton for the fused Triton MLP) it times whole training
steps (ray sampling on the device, both levels, loss, backward, Adam, the
schedule), then the parts of a step on their own (sampling + Gaussians, IPE,
MLP forward and backward, compositing), renders one full frame and one
grid_size^3 density grid, and prints one table. Device work is timed with
synchronization around the timed region, after warm-up steps.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config as config_lib  # noqa: E402
import datasets  # noqa: E402
import ddp  # noqa: E402
import extract_mesh  # noqa: E402
import fused_mlp  # noqa: E402
import ray_utils  # noqa: E402
import train  # noqa: E402
from model import MipNeRF  # noqa: E402
from scheduler import Schedule  # noqa: E402


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, steps, warmup):
    """Median seconds of fn() over `steps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def synthetic_scene(n, size, focal_frac=1.389):
    """Random images and cameras on a sphere of radius 4 looking at the origin (Blender-like)."""
    import pose_utils
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, size, size, 3, generator=gen)
    az = torch.rand(n, generator=gen) * 360
    el = torch.rand(n, generator=gen) * 60 + 10
    c2w = pose_utils.spherical_pose(az, el, 4.0)
    focal = focal_frac * size
    pix2cam = ray_utils.pinhole_pix2cam(focal, size, size).expand(n, 3, 3).contiguous()
    return datasets.SceneData(images, pix2cam, c2w, 2., 6.)


def make_cfg(args, precision, kernels):
    argv = ['--dataset_name', 'blender', '--base_dir', args.base_dir or '.', '--batch_size', str(args.batch_size),
            '--num_samples', str(args.num_samples), '--net_width', str(args.net_width), '--precision', precision,
            '--kernels', kernels, '--max_steps', '1000000']
    return config_lib.get_config(argv, need_data=False)


def bench_variant(name, args, data, device):
    precision, *extras = name.split('+')
    unknown = set(extras) - {'compile', 'triton'}
    if unknown:
        raise SystemExit(f'benchmark.py: error: unknown variant option {"+".join(unknown)} in {name!r} '
                         '(use compile or triton)')
    cfg = make_cfg(args, precision, 'triton' if 'triton' in extras else 'torch')
    torch.manual_seed(0)
    model = MipNeRF.from_config(cfg).to(device)
    if cfg.kernels == 'triton' and model.fused_reason(device):
        raise SystemExit(f'benchmark.py: error: variant {name}: {model.fused_reason(device)}')
    if 'compile' in extras:
        model.mlp.compile()
    net = model
    if ddp.launched():   # the DDP path, as train.py takes it under torchrun
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    opt = model.watch_optimizer(torch.optim.Adam(model.parameters(), lr=cfg.lr_init))
    schedule = Schedule(cfg)
    sampler = datasets.RaySampler(data, cfg.batch_size, device, seed=0)

    def step():
        train.train_step(net, opt, schedule, sampler, cfg, 0)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(step, device, args.steps, args.warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else float('nan')

    # Parts of a step, each on its own (forward and backward where there is one).
    a = model.args
    rays, _ = sampler.sample()
    parts = {}
    parts['sample+gauss'] = timed(lambda: ray_utils.sample_along_rays(
        rays.origins, rays.directions, rays.radii, a.num_samples, rays.near, rays.far, True, False, 'cone'),
        device, args.steps, 2)
    t_vals, (mean, cov) = ray_utils.sample_along_rays(
        rays.origins, rays.directions, rays.radii, a.num_samples, rays.near, rays.far, True, False, 'cone')
    parts['ipe'] = timed(lambda: ray_utils.integrated_pos_enc(mean, cov, a.min_deg_point, a.max_deg_point),
                         device, args.steps, 2)
    x = ray_utils.integrated_pos_enc(mean, cov, a.min_deg_point, a.max_deg_point)
    view = ray_utils.pos_enc(rays.viewdirs, 0, a.deg_view, True)

    def mlp_fwd_bwd():
        if model.use_fused(x):
            rgb, dens = fused_mlp.fused_forward(model.mlp, model.packed_weights(), x, view)
        elif model.bf16:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                rgb, dens = model.mlp(x, view)
        else:
            rgb, dens = model.mlp(x, view)
        (rgb.float().sum() + dens.float().sum()).backward()
    parts['mlp fwd+bwd (1 level)'] = timed(mlp_fwd_bwd, device, args.steps, 2)
    rgb = torch.rand(mean.shape, device=device)
    dens = torch.rand(mean.shape[:-1], device=device)
    parts['composite'] = timed(lambda: ray_utils.volumetric_rendering(rgb, dens, t_vals, rays.directions, True),
                               device, args.steps, 2)

    # One full frame, and one density grid.
    frame = data.rays_of_image(0)
    render_s = timed(lambda: model.render_image(frame, args.chunk), device, 1, 1)
    density_fn, _ = extract_mesh.model_fns(model.eval(), 3. / (args.grid_size - 1))
    lo, hi = np.full(3, -1.5), np.full(3, 1.5)
    grid_s = timed(lambda: extract_mesh.density_grid(density_fn, lo, hi, args.grid_size, 1 << 20, device,
                                                     progress=False), device, 1, 1)
    return dict(name=name, rays_s=cfg.batch_size / step_s, ms=step_s * 1e3, render_s=render_s, grid_s=grid_s,
                peak_gb=peak, parts={k: v * 1e3 for k, v in parts.items()}, frame=tuple(frame.origins.shape[:2]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='auto')
    ap.add_argument('--base_dir', default=None, help='a Blender scene (default: synthetic images)')
    ap.add_argument('--variants', default='fp32,tf32,bf16', help='comma-separated precisions, "+compile" to compile')
    ap.add_argument('--batch_size', type=int, default=4096)
    ap.add_argument('--num_samples', type=int, default=128)
    ap.add_argument('--net_width', type=int, default=256)
    ap.add_argument('--image_size', type=int, default=800, help='synthetic image size')
    ap.add_argument('--grid_size', type=int, default=256)
    ap.add_argument('--chunk', type=int, default=8192)
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--quick', action='store_true', help='small sizes (CPU smoke test)')
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.num_samples, args.net_width = 256, 16, 64
        args.image_size, args.grid_size, args.steps, args.warmup = 32, 16, 3, 1
    device = ddp.setup(config_lib.resolve_device(args.device))
    if args.base_dir:
        data = datasets.get_dataset('blender', args.base_dir, 'train')
    else:
        data = synthetic_scene(8 if args.quick else 100, args.image_size)
    print(f'device: {torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}'
          + (f' (DDP, {ddp.world_size()} process)' if ddp.launched() else '') + ', '
          f'torch {torch.__version__}, batch {args.batch_size}, 2 x {args.num_samples} samples, '
          f'width {args.net_width}, data {args.base_dir or "synthetic"}', flush=True)
    rows = []
    for name in args.variants.split(','):
        rows.append(bench_variant(name, args, data, device))
        r = rows[-1]
        print(f"  {name}: {r['rays_s']:,.0f} rays/s; parts (ms) "
              + ', '.join(f'{k} {v:.2f}' for k, v in r['parts'].items()), flush=True)
    h, w = rows[0]['frame']
    print(f'\n| variant | rays/s | ms/step | render s/frame ({w}x{h}) | mesh grid s ({args.grid_size}^3) | peak GB |')
    print('|---|---:|---:|---:|---:|---:|')
    for r in rows:
        peak = '-' if np.isnan(r['peak_gb']) else f"{r['peak_gb']:.2f}"
        print(f"| {r['name']} | {r['rays_s']:,.0f} | {r['ms']:.1f} | {r['render_s']:.2f} | {r['grid_s']:.2f} | {peak} |")


if __name__ == '__main__':
    main()
