"""Speed benchmark: training throughput, rendering and mesh-grid time, peak memory.

    python scripts/benchmark.py                                    # GPU, default network, synthetic 800x800 data
    python scripts/benchmark.py --base_dir data/nerf_synthetic/lego --variants fp32,tf32,bf16,bf16+compile
    python scripts/benchmark.py --quick --device cpu               # small sizes: a smoke test for CI

For each variant (a precision, then optionally +compile for torch.compile of
the MLP, +nograph for the step without its CUDA graph) it times whole training
steps (ray sampling on the device, both levels, loss, backward, Adam, the
schedule) back to back, as train.py runs them (train_utils.Stepper: one CUDA
graph where it can; the host queues work ahead; one synchronization at the
end), then the parts of a step on their own (sampling + Gaussians, IPE, MLP
forward and backward, compositing; medians, synchronized around each), renders
one full frame and one grid_size^3 density grid, and prints one table, after
warm-up steps. Under torchrun every process trains (DistributedDataParallel)
and rank 0 alone prints, with rays/s summed over the processes.

    torchrun --standalone --nproc_per_node=2 scripts/benchmark.py --variants bf16+compile
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli
import config as config_lib

# The modules that run the benchmark are imported where they are used, after
# the flags are checked: a bad flag fails in seconds, not after importing them.


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


def back_to_back(fn, device, steps, warmup):
    """Seconds per call of fn() over `steps` calls in a row after `warmup` calls, synchronized once."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / steps


def synthetic_scene(n, size, focal_frac=1.389):
    """Random images and cameras on a sphere of radius 4 looking at the origin (Blender-like)."""
    import datasets
    import pose_utils
    import ray_utils

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, size, size, 3, generator=gen)
    az = torch.rand(n, generator=gen) * 360
    el = torch.rand(n, generator=gen) * 60 + 10
    c2w = pose_utils.spherical_pose(az, el, 4.0)
    focal = focal_frac * size
    pix2cam = ray_utils.pinhole_pix2cam(focal, size, size).expand(n, 3, 3).contiguous()
    return datasets.SceneData(images, pix2cam, c2w, 2.0, 6.0)


def make_cfg(args, precision, compile, graph=True):
    argv = (['--config', '360.txt'] if args.model == 'mipnerf360' else []) + [
        '--dataset_name',
        'blender',
        '--base_dir',
        args.base_dir or '.',
        '--batch_size',
        str(args.batch_size),
        '--num_samples',
        str(args.num_samples),
        '--net_width',
        str(args.net_width),
        '--precision',
        precision,
        '--compile',
        str(compile).lower(),
        '--max_steps',
        '1000000',
        '--cuda_graph',
        str(graph).lower(),
    ]
    return config_lib.get_config(argv, need_data=False)


def bench_variant(name, args, data, device):
    import datasets
    import ddp
    import fused_mlp
    import meshing
    import ray_utils
    import runs
    import train_utils
    from model import MLP
    from scheduler import Schedule

    precision, *extras = name.split('+')
    problem = 'compile' in extras and runs.compile_problem(device)
    if problem:
        fail(f'--variants {args.variants}: torch.compile cannot run on {device} here ({problem}); drop +compile')
    cfg = make_cfg(args, precision, 'compile' in extras, 'nograph' not in extras)
    torch.manual_seed(0)
    model = runs.build_model(cfg).to(device)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    fused = model.bf16 and any(fused_mlp.usable(m, device) for m in mlps)  # (says in one line why not, if not)
    net = model
    if ddp.launched():  # the DDP path, as train.py takes it under torchrun
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None
        )
    opt = runs.build_optimizer(model, cfg)
    schedule = Schedule(cfg)
    sampler = datasets.RaySampler(data, cfg.batch_size, device, seed=0, batching=cfg.batching)

    stepper = train_utils.Stepper(net, opt, schedule, sampler, cfg, device)  # as train.py's loop

    def step():
        stepper(0)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    warmup = args.warmup if stepper.problem else max(args.warmup, stepper.WARMUP + 1)  # (captured before timing)
    step_s = back_to_back(step, device, args.steps, warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan')

    frame = data.rays_of_image(0)
    row = dict(
        name=name,
        rays_s=cfg.batch_size * ddp.world_size() / step_s,
        ms=step_s * 1e3,
        render_s=float('nan'),
        grid_s=float('nan'),
        peak_gb=peak,
        parts={},
        mlp='fused kernels' if fused else 'torch' + (', compiled' if cfg.compile else ''),
        graph='one CUDA graph' if not stepper.problem else f'no CUDA graph: {stepper.problem}',
        frame=tuple(frame.origins.shape[:2]),
    )
    if args.train_only:  # a scaling run: the step alone
        return row
    row['render_s'] = timed(lambda: model.render_image(frame, args.chunk), device, 1, 1)
    if args.model == 'mipnerf360':  # the parts and the density grid below are mip-NeRF's
        return row

    # Parts of a step, each on its own (forward and backward where there is one).
    a = model.args
    rays, _ = sampler.sample()
    parts = {}
    parts['sample+gauss'] = timed(
        lambda: ray_utils.sample_along_rays(
            rays.origins, rays.directions, rays.radii, a.num_samples, rays.near, rays.far, True, False, 'cone'
        ),
        device,
        args.steps,
        2,
    )
    t_vals, (mean, cov) = ray_utils.sample_along_rays(
        rays.origins, rays.directions, rays.radii, a.num_samples, rays.near, rays.far, True, False, 'cone'
    )
    parts['ipe'] = timed(lambda: model.features(mean, cov), device, args.steps, 2)
    x = model.features(mean, cov)  # (bf16 from one kernel where the MLP runs fused)
    view = ray_utils.pos_enc(rays.viewdirs, 0, a.deg_view, True)

    def mlp_fwd_bwd():  # the MLP as training runs it: bf16 autocast, torch.compile'd or fused kernels
        rgb, dens = model.activate(model.mlp, x, view, False)
        (rgb.sum() + dens.sum()).backward()

    parts['mlp fwd+bwd (1 level)'] = timed(mlp_fwd_bwd, device, args.steps, 2)
    rgb = torch.rand(mean.shape, device=device)
    dens = torch.rand(mean.shape[:-1], device=device)
    parts['composite'] = timed(
        lambda: ray_utils.volumetric_rendering(rgb, dens, t_vals, rays.directions, True), device, args.steps, 2
    )

    # One density grid.
    density_fn, _ = meshing.model_fns(model.eval(), 3.0 / (args.grid_size - 1))
    lo, hi = np.full(3, -1.5), np.full(3, 1.5)
    row['grid_s'] = timed(
        lambda: meshing.density_grid(density_fn, lo, hi, args.grid_size, 1 << 20, device, progress=False), device, 1, 1
    )
    row['parts'] = {k: v * 1e3 for k, v in parts.items()}
    return row


# Size flags: (default, default with --quick, help). Flags given explicitly win over --quick.
SIZES = {
    'batch_size': (4096, 256, 'rays per training step'),
    'num_samples': (128, 16, 'samples per level'),
    'net_width': (256, 64, 'trunk width of the MLP'),
    'image_size': (800, 32, 'synthetic image size in pixels (ignored with --base_dir)'),
    'grid_size': (256, 16, 'nodes per axis of the timed density grid, at least 2'),
    'chunk': (8192, 8192, 'rays per forward pass when rendering the frame'),
    'steps': (20, 3, 'timed runs of each measurement (the median is reported)'),
    'warmup': (5, 1, 'untimed training steps before timing, 0 or more'),
}
SIZES_360 = {'batch_size': (16384, 256), 'num_samples': (32, 8), 'net_width': (1024, 64)}  # configs/360.txt's
PRECISIONS = ('fp32', 'tf32', 'bf16')
EXTRAS = ('compile', 'nograph')


def fail(message):
    cli.fail('benchmark.py', message)


def build_parser():
    ap = cli.Parser(
        prog='benchmark.py',
        description=__doc__.split('\n')[0],
        epilog='Size flags given explicitly win over --quick, which only changes the defaults.',
    )
    ap.add_argument('--device', default='auto', help='auto (CUDA when present), cpu, cuda or cuda:N')
    ap.add_argument('--base_dir', default=None, help='a Blender scene folder to train on (default: synthetic images)')
    ap.add_argument(
        '--model',
        default='mipnerf',
        choices=['mipnerf', 'mipnerf360'],
        help='the network: mip-NeRF (default sizes below) or mip-NeRF 360 (configs/360.txt: 16,384 rays, 32 + 2 x 64 '
        'samples, width 1024)',
    )
    ap.add_argument(
        '--variants',
        default='fp32,tf32,bf16',
        help='comma-separated precisions (fp32, tf32, bf16), each optionally with +compile (torch.compile) and '
        '+nograph (the step without its CUDA graph, --cuda_graph false)',
    )
    for name, (full, quick, text) in SIZES.items():
        # default None: filled in by parse_args() from --quick, so that explicit flags win over it.
        ap.add_argument(
            f'--{name}',
            type=int if name == 'warmup' else cli.positive_int,
            default=None,
            metavar='N',
            help=f'{text} (default: {full}; {quick} with --quick)' if full != quick else f'{text} (default: {full})',
        )
    ap.add_argument(
        '--train_only',
        action='store_true',
        help='time the training step alone (no parts, frame or density grid): scaling runs under torchrun',
    )
    ap.add_argument(
        '--quick',
        action='store_true',
        help='small default sizes and 8 synthetic images, a CPU smoke test; explicit size flags still win',
    )
    return ap


def check_variants(spec):
    names = spec.split(',')
    for name in names:
        precision, *extras = name.split('+')
        if precision not in PRECISIONS:
            fail(f'--variants {spec}: {name!r} must start with a precision, one of {", ".join(PRECISIONS)}')
        unknown = [e for e in extras if e not in EXTRAS]
        if unknown:
            fail(f'--variants {spec}: unknown option {"+".join(unknown)} in {name!r} (use +compile or +nograph)')
    return names


def parse_args(argv=None):
    """Flags, with the size defaults of --quick filled in where not given; exits 2 with one line on a bad value."""
    args = build_parser().parse_args(argv)
    for name, (full, quick, _) in SIZES.items():
        if getattr(args, name) is None:
            full, quick = SIZES_360.get(name, (full, quick)) if args.model == 'mipnerf360' else (full, quick)
            setattr(args, name, quick if args.quick else full)
    if args.grid_size < 2:
        fail(f'--grid_size must be at least 2, got {args.grid_size}')
    if args.warmup < 0:
        fail(f'--warmup must not be negative, got {args.warmup}')
    check_variants(args.variants)
    return args


def main(argv=None):
    args = parse_args(argv)
    variants = args.variants.split(',')
    import runs

    try:
        device = runs.resolve_device(args.device)
    except (config_lib.ConfigError, RuntimeError) as e:
        fail(e if isinstance(e, config_lib.ConfigError) else f'--device {args.device}: {e}')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        fail(f'--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 or auto')
    if args.base_dir and not os.path.isfile(os.path.join(args.base_dir, 'transforms_train.json')):
        what = 'holds no transforms_train.json' if os.path.isdir(args.base_dir) else 'is not a folder'
        fail(
            f'--base_dir {args.base_dir} {what}: pass a Blender scene folder (e.g. data/nerf_synthetic/lego) '
            'or omit it for synthetic images'
        )
    import datasets
    import ddp

    device = ddp.setup(device)
    if args.base_dir:
        try:
            data = datasets.get_dataset('blender', args.base_dir, 'train')
        except datasets.DataError as e:
            fail(f'--base_dir {args.base_dir}: {e}')
    else:
        data = synthetic_scene(8 if args.quick else 100, args.image_size)
    say = print if ddp.is_main() else lambda *a, **k: None  # under torchrun, rank 0 speaks for all
    say(
        f'device: {torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}'
        + (f' (DDP, {ddp.world_size()} processes; rays/s summed over them)' if ddp.launched() else '')
        + ', '
        f'torch {torch.__version__}, batch {args.batch_size}, 2 x {args.num_samples} samples, '
        f'width {args.net_width}, data {args.base_dir or "synthetic"}',
        flush=True,
    )
    try:
        rows = []
        for name in variants:
            rows.append(bench_variant(name, args, data, device))
            r = rows[-1]
            say(
                f'  {name} (MLP: {r["mlp"]}; step: {r["graph"]}): {r["rays_s"]:,.0f} rays/s; parts (ms) '
                + ', '.join(f'{k} {v:.2f}' for k, v in r['parts'].items()),
                flush=True,
            )
        h, w = rows[0]['frame']
        say(f'\n| variant | rays/s | ms/step | render s/frame ({w}x{h}) | mesh grid s ({args.grid_size}^3) | peak GB |')
        say('|---|---:|---:|---:|---:|---:|')
        for r in rows:
            peak, render, grid = ('-' if np.isnan(r[k]) else f'{r[k]:.2f}' for k in ('peak_gb', 'render_s', 'grid_s'))
            say(f'| {r["name"]} | {r["rays_s"]:,.0f} | {r["ms"]:.1f} | {render} | {grid} | {peak} |')
    finally:
        ddp.cleanup()  # each variant's DDP wrapper is gone with its call (ddp.cleanup says why this matters)


if __name__ == '__main__':
    main()
