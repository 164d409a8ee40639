"""Extract a mesh from a trained run: density on a grid, marching cubes, cleanup.

    python extract_mesh.py --log_dir log/lego                       # log/lego/mesh.ply
    python extract_mesh.py --log_dir log/lego --grid_size 512 --colors --out log/lego/mesh.glb

The fine level's density is evaluated at the centres of a grid_size^3 grid
over the bounding box, in chunks of --chunk points (memory: the float32
grid, 4 x grid_size^3 bytes, plus one chunk; sizes whose grid would not fit
in the free memory are refused),
each point featurized as the Gaussian of its voxel (a uniform cube of side s
has per-axis variance s^2 / 12). PyMCubes extracts the `--threshold`
isosurface; vertices are mapped from grid indices to world coordinates;
trimesh drops pieces smaller than `--min_component` of the largest and
writes .ply, .obj or .glb (by extension). The box defaults to the
dataset's: the [-1.5, 1.5]^3 cube for Blender-style scenes, the NDC cube
[-1, 1]^3 for LLFF (the mesh is then in NDC).

The output file is written as <name>.partial.<ext> and renamed when complete;
an unwritable --out, an empty mesh, an error, Ctrl-C or SIGTERM leave no
partial file (and no folder this script made).
"""

import math
import os

import cli
import config

PROG = 'extract_mesh.py'


def build_parser():
    p = config.run_parser('Extract a marching-cubes mesh from a trained mip-NeRF.', chunk=1 << 18, data=False)
    p.add_argument(
        '--grid_size', type=int, default=256, help='grid nodes per axis, at least 2 (memory: 4 x grid_size^3 bytes)'
    )
    p.add_argument(
        '--threshold',
        type=float,
        default=None,
        help="density of the surface (default: the run's --mesh_threshold, else chosen from the density "
        'field, with a note saying which)',
    )
    p.add_argument(
        '--bbox',
        type=float,
        nargs=6,
        default=None,
        metavar=('XMIN', 'YMIN', 'ZMIN', 'XMAX', 'YMAX', 'ZMAX'),
        help="bounding box (default: the dataset's)",
    )
    cli.add_bool(p, '--colors', False, "add vertex colours (the model's colour seen along the normal)")
    p.add_argument(
        '--min_component',
        type=float,
        default=0.05,
        help='drop pieces with fewer faces than this fraction (0 to 1) of the largest (0: keep all)',
    )
    p.add_argument('--out', default=None, help='.ply, .obj or .glb file (default: <log_dir>/mesh.ply)')
    p.prog = PROG  # errors name the script also when main() is called from Python
    return p


def fail(message):
    cli.fail(PROG, message)


def available_memory():
    """Bytes of memory free for a new allocation (MemAvailable on Linux), or None if unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (AttributeError, ValueError, OSError):
        return None


def human_bytes(n):
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'):
        if n < 1024 or unit == 'EiB':
            return f'{n:.3g} {unit}'
        n /= 1024


def check_grid_size(n, free=None):
    """A one-line problem with --grid_size n (None if fine): at least 2, and a grid that fits in memory."""
    if n < 2:
        return f'--grid_size must be at least 2, got {n}'
    free = available_memory() if free is None else free
    budget = None if free is None else 0.8 * free  # leave room for the model, a chunk and the mesh
    need = 4 * n**3
    if budget is not None and need > budget:
        largest = int((budget / 4) ** (1 / 3))
        while 4 * (largest + 1) ** 3 <= budget:
            largest += 1
        while largest > 2 and 4 * largest**3 > budget:
            largest -= 1
        return (
            f'--grid_size {n}: its float32 grid needs {human_bytes(need)}, more than the '
            f'{human_bytes(free)} of free memory here; use --grid_size {largest} or less'
        )
    return None


def check_args(args):
    """The first problem with the flags as a one-line message, or None."""
    out = args.out or os.path.join(args.log_dir, 'mesh.ply')
    if os.path.splitext(out)[1].lower() not in ('.ply', '.obj', '.glb'):
        return f'--out {out}: use a .ply, .obj or .glb file name'
    problem = check_grid_size(args.grid_size)
    if problem:
        return problem
    if not 0 <= args.min_component <= 1:
        return (
            f"--min_component must be between 0 and 1 (a fraction of the largest piece's faces; 0 keeps "
            f'every piece), got {args.min_component:g}'
        )
    if args.threshold is not None and not math.isfinite(args.threshold):
        return f'--threshold must be a finite number, got {args.threshold:g}'
    if args.bbox is not None:
        lo, hi = args.bbox[:3], args.bbox[3:]
        if not all(map(math.isfinite, args.bbox)) or any(b <= a for a, b in zip(lo, hi)):
            return (
                f'--bbox {" ".join(f"{v:g}" for v in args.bbox)}: give finite XMIN YMIN ZMIN XMAX YMAX ZMAX, '
                'each max above its min'
            )
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        fail(problem)
    import ddp
    import runs

    out = args.out or os.path.join(args.log_dir, 'mesh.ply')
    made, lock = [], None
    try:
        with cli.stop_on_signals(prog=PROG):  # Ctrl-C and SIGTERM: clean up, one line, exit 130 or 143
            try:
                model, cfg, ckpt, device, _ = runs.open_run(args)
            except (FileNotFoundError, ValueError) as e:
                fail(e)
            if getattr(cfg, 'model', 'mipnerf') != 'mipnerf':
                fail(
                    f'{args.log_dir} is a {cfg.model} run: meshes are made from mip-NeRF runs only (an unbounded '
                    "scene's contracted space has no box to mesh); use eval.py or visualize.py for it"
                )
            flag = (
                ('--out', 'pick a writable place')
                if args.out
                else ('--log_dir', 'pass --out with a writable file name')
            )
            try:
                made, lock = runs.prepare_out_dir(device, os.path.dirname(os.path.abspath(out)), out, *flag, value=out)
            except ValueError as e:
                fail(e)
            extract(args, out, model, cfg, ckpt, device)
    finally:
        if lock is not None:
            lock.release()
        cli.remove_empty_dirs(made)  # a folder made here stays only if it holds the mesh
        ddp.cleanup()


def extract(args, out, model, cfg, ckpt, device):
    """The density grid (split over the ranks), then on rank 0 the mesh, written to `out`."""
    import numpy as np
    import torch
    import trimesh

    import ddp
    import meshing

    bbox = args.bbox or meshing.DEFAULT_BBOX.get(cfg.dataset_name, meshing.BLENDER_BBOX)
    lo, hi = np.array(bbox[:3]), np.array(bbox[3:])
    voxel = float(np.max((hi - lo) / (args.grid_size - 1)))
    density_fn, colors_fn = meshing.model_fns(model, voxel)
    grid = meshing.density_grid(density_fn, lo, hi, args.grid_size, args.chunk, device)
    if not ddp.is_main():
        return
    threshold, how = args.threshold, '--threshold'
    if threshold is None and getattr(cfg, 'mesh_threshold', None) is not None:
        threshold, how = cfg.mesh_threshold, "the run's --mesh_threshold"
    if threshold is None:
        threshold, how = meshing.surface_threshold(grid, voxel)
    if not grid.min() < threshold < grid.max():
        fail(
            f'no surface: the density ranges over [{grid.min():.3g}, {grid.max():.3g}] '
            f'and the threshold is {threshold:g} ({how}); pick a --threshold inside that range'
        )
    print(f'surface at density {threshold:.3g} ({how})')
    vertices, faces = meshing.grid_to_mesh(grid, lo, hi, threshold)
    del grid
    if len(faces) == 0:
        fail(
            f'the mesh is empty: no surface at threshold {threshold:g} on the {args.grid_size}^3 grid; '
            'try another --threshold or a larger --grid_size'
        )
    mesh = meshing.remove_small_components(trimesh.Trimesh(vertices, faces, process=False), args.min_component)
    if len(mesh.faces) == 0:
        fail(
            f'the mesh is empty after dropping the pieces smaller than --min_component {args.min_component:g} '
            'of the largest; lower --min_component (0 keeps every piece)'
        )
    if args.colors:
        pts = torch.tensor(mesh.vertices, dtype=torch.float32)
        rgb = torch.cat([colors_fn(pts[i : i + args.chunk]).cpu() for i in range(0, len(pts), args.chunk)])
        mesh.visual.vertex_colors = np.concatenate(
            [(rgb.numpy() * 255 + 0.5).astype(np.uint8), np.full((len(pts), 1), 255, np.uint8)], 1
        )
    try:
        with cli.atomic_output(out) as tmp:
            mesh.export(tmp)
    except OSError as e:
        fail(f'writing {out} failed ({e.strerror or e}); nothing written')
    print(
        f'wrote {out}: {len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces '
        f'(grid {args.grid_size}^3 over {bbox}, threshold {threshold:g}, step {ckpt["step"]})'
    )


if __name__ == '__main__':
    main()
