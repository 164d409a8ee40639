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
import signal
import sys

import mcubes
import numpy as np
import torch
import trimesh
from tqdm import tqdm

import config as config_lib
import ddp
import ray_utils
from model import open_run
from visualize import Stopped, prepare_out_dir, remove_empty_dirs, remove_files, stop_on_signals

DEFAULT_BBOX = {'llff': (-1., -1., -1., 1., 1., 1.)}
BLENDER_BBOX = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5)


def grid_points(bbox_min, bbox_max, n):
    """The n per axis coordinates of grid nodes, spanning the box inclusively, `[3, n]`."""
    return np.stack([np.linspace(lo, hi, n) for lo, hi in zip(bbox_min, bbox_max)])


@torch.no_grad()
def density_grid(density_fn, bbox_min, bbox_max, n, chunk=1 << 18, device='cpu', progress=True):
    """Evaluate `density_fn(points [P, 3]) -> [P]` on an n^3 grid, chunk by chunk.

    Returns a float32 numpy array `[n, n, n]` indexed [x, y, z]. Under
    torchrun the x-slabs are dealt round-robin to the ranks and gathered on
    rank 0, one block per rank at a time; other ranks get None.
    """
    rank, world, main = ddp.rank(), ddp.world_size(), ddp.is_main()
    axes = [torch.tensor(a, dtype=torch.float32, device=device) for a in grid_points(bbox_min, bbox_max, n)]
    grid = np.empty((n, n, n), dtype=np.float32) if main else None
    rows = max(1, chunk // (n * n))   # x-slabs per block
    starts = list(range(0, n, rows))
    for first in tqdm(range(0, len(starts), world), desc='density grid', disable=not (progress and main),
                      dynamic_ncols=True):
        block, values = first + rank, None
        if block < len(starts):
            xs = axes[0][starts[block]:starts[block] + rows]
            pts = torch.stack(torch.meshgrid(xs, axes[1], axes[2], indexing='ij'), -1).reshape(-1, 3)
            values = torch.cat([density_fn(p).float().cpu() for p in pts.split(chunk)])
            values = values.reshape(len(xs), n, n).numpy()
        for k, v in ddp.gather((block, values)) or []:
            if v is not None:
                grid[starts[k]:starts[k] + len(v)] = v
    return grid


def grid_to_mesh(grid, bbox_min, bbox_max, threshold):
    """Marching cubes of the `threshold` level set; vertices in world coordinates."""
    vertices, faces = mcubes.marching_cubes(grid, threshold)
    n = np.array(grid.shape, dtype=np.float64)
    lo, hi = np.asarray(bbox_min, np.float64), np.asarray(bbox_max, np.float64)
    vertices = lo + vertices * (hi - lo) / (n - 1)        # index i sits at lo + i * voxel
    return vertices, faces    # PyMCubes winds faces outwards (towards decreasing density)


def remove_small_components(mesh, min_fraction):
    """Drop connected pieces with fewer faces than min_fraction of the largest piece.

    Works on face labels (no per-piece meshes), so noisy meshes with
    thousands of floaters stay cheap.
    """
    if len(mesh.faces) == 0 or min_fraction <= 0:
        return mesh
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    counts = np.bincount(labels)
    keep = counts[labels] >= min_fraction * counts.max()
    if keep.all():
        return mesh
    mesh = mesh.copy()
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return mesh


def model_fns(model, voxel_size):
    """Density of points as voxel Gaussians, and colours seen from outside along the normal."""
    device = next(model.parameters()).device
    var = voxel_size ** 2 / 12

    def encode_view(dirs):
        return ray_utils.pos_enc(dirs, 0, model.args.deg_view, True) if model.args.use_viewdirs else None

    def density(points):
        cov = torch.full_like(points, var)
        dirs = torch.zeros_like(points)
        dirs[:, 2] = 1
        return model.query(points[:, None].to(device), cov[:, None].to(device), encode_view(dirs.to(device)))[1][:, 0]

    def colors(points):
        with torch.enable_grad():
            p = points.to(device).requires_grad_(True)
            d = density(p)
            grad, = torch.autograd.grad(d.sum(), p)
        normal = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cov = torch.full_like(p, var)
        with torch.no_grad():
            rgb = model.query(p.detach()[:, None], cov[:, None], encode_view(-normal))[0][:, 0]
        return rgb.clamp(0, 1)
    return density, colors


PROG = 'extract_mesh.py'


def build_parser():
    p = config_lib.run_parser('Extract a marching-cubes mesh from a trained mip-NeRF.', chunk=1 << 18, data=False)
    p.add_argument('--grid_size', type=int, default=256,
                   help='grid nodes per axis, at least 2 (memory: 4 x grid_size^3 bytes)')
    p.add_argument('--threshold', type=float, default=50., help='density of the surface')
    p.add_argument('--bbox', type=float, nargs=6, default=None, metavar=('XMIN', 'YMIN', 'ZMIN', 'XMAX', 'YMAX', 'ZMAX'),
                   help='bounding box (default: the dataset\'s)')
    p.add_argument('--colors', type=config_lib.str2bool, nargs='?', const=True, default=False, metavar='BOOL',
                   help='add vertex colours (the model\'s colour seen along the normal)')
    p.add_argument('--min_component', type=float, default=0.05,
                   help='drop pieces with fewer faces than this fraction (0 to 1) of the largest (0: keep all)')
    p.add_argument('--out', default=None, help='.ply, .obj or .glb file (default: <log_dir>/mesh.ply)')
    p.prog = PROG    # errors name the script also when main() is called from Python
    return p


def fail(message):
    config_lib.fail(PROG, message)


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
    budget = None if free is None else 0.8 * free        # leave room for the model, a chunk and the mesh
    need = 4 * n ** 3
    if budget is not None and need > budget:
        largest = int((budget / 4) ** (1 / 3))
        while 4 * (largest + 1) ** 3 <= budget:
            largest += 1
        while largest > 2 and 4 * largest ** 3 > budget:
            largest -= 1
        return (f'--grid_size {n}: its float32 grid needs {human_bytes(need)}, more than the '
                f'{human_bytes(free)} of free memory here; use --grid_size {largest} or less')
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
        return (f'--min_component must be between 0 and 1 (a fraction of the largest piece\'s faces; 0 keeps '
                f'every piece), got {args.min_component:g}')
    if not math.isfinite(args.threshold):
        return f'--threshold must be a finite number, got {args.threshold:g}'
    if args.bbox is not None:
        lo, hi = np.array(args.bbox[:3]), np.array(args.bbox[3:])
        if not np.all(np.isfinite(args.bbox)) or np.any(hi <= lo):
            return f'--bbox {" ".join(f"{v:g}" for v in args.bbox)}: give finite XMIN YMIN ZMIN XMAX YMAX ZMAX, ' \
                   'each max above its min'
    return None


def partial_path(out):
    ext = os.path.splitext(out)[1]
    return out[:-len(ext)] + '.partial' + ext


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        fail(problem)
    out = args.out or os.path.join(args.log_dir, 'mesh.ply')
    made = []
    try:
        with stop_on_signals():   # Ctrl-C and SIGTERM: clean up, one line, exit 130 or 143
            try:
                model, cfg, ckpt, device, _ = open_run(args)
            except (FileNotFoundError, ValueError, config_lib.ConfigError) as e:
                fail(e)
            problem = None
            if ddp.is_main():
                try:
                    made = prepare_out_dir(os.path.dirname(os.path.abspath(out)), partial_path(out),
                                           *(('--out', 'pick a writable place') if args.out else
                                             ('--log_dir', 'pass --out with a writable file name')), out)
                except ValueError as e:
                    problem = str(e)
            if ddp.any_rank([problem is not None], device)[0]:     # every rank stops, not only rank 0
                if problem:
                    fail(problem)
                sys.exit(2)
            extract(args, out, model, cfg, ckpt, device)
    except Stopped as e:
        sys.stderr.write(f'{PROG}: stopped by {signal.Signals(e.signum).name}; nothing written\n')
        sys.exit(128 + e.signum)          # 130 for Ctrl-C, 143 for SIGTERM, as train.py
    finally:
        remove_empty_dirs(made)           # a folder made here stays only if it holds the mesh
        ddp.cleanup()


def extract(args, out, model, cfg, ckpt, device):
    bbox = args.bbox or DEFAULT_BBOX.get(cfg.dataset_name, BLENDER_BBOX)
    lo, hi = np.array(bbox[:3]), np.array(bbox[3:])
    voxel = float(np.max((hi - lo) / (args.grid_size - 1)))
    density_fn, colors_fn = model_fns(model, voxel)
    grid = density_grid(density_fn, lo, hi, args.grid_size, args.chunk, device)
    if not ddp.is_main():
        return
    if not grid.min() < args.threshold < grid.max():
        fail(f'no surface: the density ranges over [{grid.min():.3g}, {grid.max():.3g}] '
             f'and --threshold is {args.threshold:g}; pick a threshold inside that range')
    vertices, faces = grid_to_mesh(grid, lo, hi, args.threshold)
    del grid
    if len(faces) == 0:
        fail(f'the mesh is empty: no surface at --threshold {args.threshold:g} on the {args.grid_size}^3 grid; '
             'try another --threshold or a larger --grid_size')
    mesh = remove_small_components(trimesh.Trimesh(vertices, faces, process=False), args.min_component)
    if len(mesh.faces) == 0:
        fail(f'the mesh is empty after dropping the pieces smaller than --min_component {args.min_component:g} '
             'of the largest; lower --min_component (0 keeps every piece)')
    if args.colors:
        pts = torch.tensor(mesh.vertices, dtype=torch.float32)
        rgb = torch.cat([colors_fn(pts[i:i + args.chunk]).cpu() for i in range(0, len(pts), args.chunk)])
        mesh.visual.vertex_colors = np.concatenate(
            [(rgb.numpy() * 255 + 0.5).astype(np.uint8), np.full((len(pts), 1), 255, np.uint8)], 1)
    tmp = partial_path(out)
    try:
        mesh.export(tmp)
        os.replace(tmp, out)
    except OSError as e:
        remove_files([tmp], PROG)
        fail(f'writing {out} failed ({e.strerror or e}); nothing written')
    except BaseException:
        remove_files([tmp], PROG)
        raise
    print(f'wrote {out}: {len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces '
          f'(grid {args.grid_size}^3 over {bbox}, threshold {args.threshold:g}, step {ckpt["step"]})')


if __name__ == '__main__':
    main()
