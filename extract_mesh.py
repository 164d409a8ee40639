"""Extract a mesh from a trained run: density on a grid, marching cubes, cleanup.

    python extract_mesh.py --log_dir log/lego                       # log/lego/mesh.ply
    python extract_mesh.py --log_dir log/lego --grid_size 512 --colors --out log/lego/mesh.glb

The fine level's density is evaluated at the centres of a grid_size^3 grid
over the bounding box, in chunks (memory: the float32 grid plus one chunk),
each point featurized as the Gaussian of its voxel (a uniform cube of side s
has per-axis variance s^2 / 12). PyMCubes extracts the `--threshold`
isosurface; vertices are mapped from grid indices to world coordinates;
trimesh drops pieces smaller than `--min_component` of the largest and
writes .ply, .obj or .glb (by extension). The box defaults to the
dataset's: the [-1.5, 1.5]^3 cube for Blender-style scenes, the NDC cube
[-1, 1]^3 for LLFF (the mesh is then in NDC).
"""
import os

import mcubes
import numpy as np
import torch
import trimesh
from tqdm import tqdm

import config as config_lib
import ddp
import ray_utils
from model import open_run

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
            values = density_fn(pts).reshape(len(xs), n, n).float().cpu().numpy()
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


def build_parser():
    p = config_lib.run_parser('Extract a marching-cubes mesh from a trained mip-NeRF.', chunk=1 << 18, data=False)
    p.add_argument('--grid_size', type=int, default=256, help='grid nodes per axis')
    p.add_argument('--threshold', type=float, default=50., help='density of the surface')
    p.add_argument('--bbox', type=float, nargs=6, default=None, metavar=('XMIN', 'YMIN', 'ZMIN', 'XMAX', 'YMAX', 'ZMAX'),
                   help='bounding box (default: the dataset\'s)')
    p.add_argument('--colors', type=config_lib.str2bool, nargs='?', const=True, default=False, metavar='BOOL',
                   help='add vertex colours (the model\'s colour seen along the normal)')
    p.add_argument('--min_component', type=float, default=0.05,
                   help='drop pieces with fewer faces than this fraction of the largest (0: keep all)')
    p.add_argument('--out', default=None, help='.ply, .obj or .glb file (default: <log_dir>/mesh.ply)')
    return p


def fail(message):
    config_lib.fail('extract_mesh.py', message)


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join(args.log_dir, 'mesh.ply')
    if os.path.splitext(out)[1].lower() not in ('.ply', '.obj', '.glb'):
        fail(f'--out {out}: use a .ply, .obj or .glb file name')
    if args.grid_size < 2:
        fail(f'--grid_size must be at least 2, got {args.grid_size}')
    try:
        model, cfg, ckpt, device, _ = open_run(args)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    try:
        extract(args, out, model, cfg, ckpt, device)
    finally:
        ddp.cleanup()


def extract(args, out, model, cfg, ckpt, device):
    bbox = args.bbox or DEFAULT_BBOX.get(cfg.dataset_name, BLENDER_BBOX)
    lo, hi = np.array(bbox[:3]), np.array(bbox[3:])
    if np.any(hi <= lo):
        fail(f'--bbox {bbox}: each max must exceed its min')
    voxel = float(np.max((hi - lo) / (args.grid_size - 1)))
    density_fn, colors_fn = model_fns(model, voxel)
    grid = density_grid(density_fn, lo, hi, args.grid_size, args.chunk, device)
    if not ddp.is_main():
        return
    if not grid.min() < args.threshold < grid.max():
        fail(f'no surface: the density ranges over [{grid.min():.3g}, {grid.max():.3g}] '
             f'and --threshold is {args.threshold:g}; pick a threshold inside that range')
    vertices, faces = grid_to_mesh(grid, lo, hi, args.threshold)
    mesh = remove_small_components(trimesh.Trimesh(vertices, faces, process=False), args.min_component)
    if args.colors:
        pts = torch.tensor(mesh.vertices, dtype=torch.float32)
        rgb = torch.cat([colors_fn(pts[i:i + args.chunk]).cpu() for i in range(0, len(pts), args.chunk)])
        mesh.visual.vertex_colors = np.concatenate(
            [(rgb.numpy() * 255 + 0.5).astype(np.uint8), np.full((len(pts), 1), 255, np.uint8)], 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    ext = os.path.splitext(out)[1]
    tmp = out[:-len(ext)] + '.partial' + ext
    mesh.export(tmp)
    os.replace(tmp, out)
    print(f'wrote {out}: {len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces '
          f'(grid {args.grid_size}^3 over {bbox}, threshold {args.threshold:g}, step {ckpt["step"]})')


if __name__ == '__main__':
    main()
