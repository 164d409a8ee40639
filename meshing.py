"""Meshes from a density field: the grid, marching cubes, cleanup, colours.

    density_fn, colors_fn = model_fns(model, voxel_size)
    grid = density_grid(density_fn, bbox_min, bbox_max, n)       # [n, n, n], chunk by chunk
    vertices, faces = grid_to_mesh(grid, bbox_min, bbox_max, threshold)
    mesh = remove_small_components(trimesh.Trimesh(vertices, faces), 0.05)

Each grid point is featurized as the Gaussian of its voxel (a uniform cube of
side s has per-axis variance s^2 / 12).
"""

import mcubes
import numpy as np
import torch
import trimesh
from tqdm import tqdm

import ddp
import ray_utils

# The box of a dataset: the NDC cube for LLFF (the mesh is then in NDC), [-1.5, 1.5]^3 otherwise.
DEFAULT_BBOX = {'llff': (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)}
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
    rows = max(1, chunk // (n * n))  # x-slabs per block
    starts = list(range(0, n, rows))
    for first in tqdm(
        range(0, len(starts), world),
        desc='density grid',
        disable=None if progress and main else True,
        dynamic_ncols=True,
    ):
        block, values = first + rank, None
        if block < len(starts):
            xs = axes[0][starts[block] : starts[block] + rows]
            pts = torch.stack(torch.meshgrid(xs, axes[1], axes[2], indexing='ij'), -1).reshape(-1, 3)
            values = torch.cat([density_fn(p).float().cpu() for p in pts.split(chunk)])
            values = values.reshape(len(xs), n, n).numpy()
        for k, v in ddp.gather((block, values)) or []:
            if v is not None:
                grid[starts[k] : starts[k] + len(v)] = v
    return grid


def grid_to_mesh(grid, bbox_min, bbox_max, threshold):
    """Marching cubes of the `threshold` level set; vertices in world coordinates."""
    vertices, faces = mcubes.marching_cubes(grid, threshold)
    n = np.array(grid.shape, dtype=np.float64)
    lo, hi = np.asarray(bbox_min, np.float64), np.asarray(bbox_max, np.float64)
    vertices = lo + vertices * (hi - lo) / (n - 1)  # index i sits at lo + i * voxel
    return vertices, faces  # PyMCubes winds faces outwards (towards decreasing density)


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
    var = voxel_size**2 / 12

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
            (grad,) = torch.autograd.grad(d.sum(), p)
        normal = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cov = torch.full_like(p, var)
        with torch.no_grad():
            rgb = model.query(p.detach()[:, None], cov[:, None], encode_view(-normal))[0][:, 0]
        return rgb.clamp(0, 1)

    return density, colors


def surface_threshold(grid, voxel_size):
    """A density level for the surface, chosen from the grid: (threshold, how it was chosen)."""
    raise NotImplementedError
