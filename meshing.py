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


# ----------------------------------------------------------------------------
# The surface level.

BINS = 64  # histogram bins over [min, top]
SMOOTH = 5  # moving-average width, bins
VALLEY_TOLERANCE = 0.1  # bins within 10% of the lowest count belong to the valley
NONEMPTY_OPACITY = 1e-3  # a voxel stopping less light than this is empty space
CLIP_PERCENTILE = 99.0  # of the non-empty voxels
SAMPLE = 1 << 21  # voxels the percentile looks at
CHUNK = 1 << 22  # voxels histogrammed at a time


def otsu_split(hist, edges):
    """Otsu's threshold of a histogram: a bin edge strictly inside (edges[0], edges[-1]).

    Ties (empty bins between two classes) resolve to the middle of the first
    run of maxima, so a two-valued field splits half-way.
    """
    centres = 0.5 * (edges[1:] + edges[:-1])
    hist = hist.astype(np.float64)
    w0 = np.cumsum(hist)[:-1]  # split after bin k: k = 0 .. bins - 2
    w1 = hist.sum() - w0
    m0 = np.cumsum(hist * centres)[:-1]
    m1 = float(np.dot(hist, centres)) - m0
    with np.errstate(divide='ignore', invalid='ignore'):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    between[~np.isfinite(between)] = -1.0
    first, last = _run(between, int(np.argmax(between)), between[int(np.argmax(between))])
    return float(0.5 * (edges[1 + first] + edges[1 + last]))


def _run(values, start, limit, below=False):
    """First and last index of the contiguous run around `start` of values == limit (<= limit if below)."""
    ok = (values <= limit) if below else (values == limit)
    first = last = start
    while first > 0 and ok[first - 1]:
        first -= 1
    while last + 1 < len(values) and ok[last + 1]:
        last += 1
    return first, last


def _histogram(values, lo, top, bins):
    """Counts of `values` in `bins` equal bins over [lo, top], values above top in the last; chunked."""
    counts = np.zeros(bins, np.int64)
    scale = bins / (top - lo)
    for i in range(0, values.size, CHUNK):
        v = np.minimum(values[i : i + CHUNK].astype(np.float64), top)
        idx = np.clip(((v - lo) * scale).astype(np.int64), 0, bins - 1)
        counts += np.bincount(idx, minlength=bins)
    return counts, np.linspace(lo, top, bins + 1)


def _strictly_inside(level, lo, hi, dtype):
    """`level` moved strictly inside (lo, hi), exact in the grid's float type where one such value exists."""
    if not lo < level < hi:
        level = lo + 0.5 * (hi - lo)
    if not np.issubdtype(dtype, np.floating):
        return float(level)
    t, lo_t, hi_t = dtype.type(level), dtype.type(lo), dtype.type(hi)
    if not lo_t < t < hi_t:
        t = np.nextafter(lo_t, hi_t)
    return float(t) if lo_t < t < hi_t else float(level)  # none of the grid's type between: float64


def surface_threshold(grid, voxel_size):
    """The surface level of a density grid, and how it was chosen.

    `grid`: densities (1/world-units) `[n, n, n]`; `voxel_size`: the grid
    spacing in world units. Returns (threshold, how): a float strictly
    inside (min, max) of the grid's finite values when they are not all
    equal (else their common value, or 0 when none is finite), and a short
    phrase for a note.

    A NeRF's density is ~0 in empty space, rises across a ramp a few voxels
    wide at the surface, and inside takes whatever training left (only the
    first opaque layer is seen); its scale depends on the run (about 10
    after a short demo run, 36 after the full demo, hundreds on real
    scenes), so no fixed level fits every run. The level is the valley of
    the density histogram between empty space and matter: a voxel count per
    density bin is the level set's area over how fast the density crosses
    it, so the emptiest bin is where the field goes from empty to solid
    most sharply, the boundary (the valley threshold of Prewitt & Mendelsohn
    1966; for a logistic ramp, its middle). Steps: densities clipped at the
    99th percentile of the non-empty voxels (density x voxel > 1e-3), so
    spikes where no camera looks do not stretch the histogram; a 64-bin
    histogram smoothed over 5 bins; Otsu's split (Otsu 1979) separates empty
    space from matter and bounds the search from above (it sits at about
    half the interior and would cut through the unconstrained inside); the
    level is the middle of the bins within 10% of the lowest between the
    empty-space peak and that split. It does not depend on how much empty
    space the box holds, scales with the density, is deterministic, and
    lies strictly inside (min, max) in the grid's float type. On the full
    demo it picks 4.5 (128^3; Chamfer 0.028 against the true surface, the
    best fixed level 0.028, Otsu's split alone 0.044). Limitation: an
    inside with a density population of its own (a hollow ball with a dense
    shell) can add an inner shell; the outer surface stays in place.
    """
    values = np.asarray(grid).ravel()
    finite = np.isfinite(values)
    if not finite.all():
        values = values[finite]
    if values.size == 0:
        return 0.0, 'no finite density in the grid: no surface'
    lo, hi = float(values.min()), float(values.max())
    if not lo < hi:
        return lo, f'the density is {lo:.3g} everywhere: no surface'
    sample = values if values.size <= SAMPLE else values[np.random.default_rng(0).integers(0, values.size, SAMPLE)]
    sample = sample.astype(np.float64)
    nonempty = sample[sample * float(voxel_size) > NONEMPTY_OPACITY]
    top = float(np.percentile(nonempty, CLIP_PERCENTILE)) if nonempty.size >= 2 else hi
    if not top > lo:  # the clip would flatten everything
        top = hi
    hist, edges = _histogram(values, lo, top, BINS)
    split = otsu_split(hist, edges)
    smooth = np.convolve(np.pad(hist.astype(np.float64), SMOOTH // 2, mode='edge'), np.ones(SMOOTH) / SMOOTH, 'valid')
    centres = 0.5 * (edges[1:] + edges[:-1])
    below = np.flatnonzero(centres < split)
    level, rule = split, "Otsu's split between empty space and matter"
    if below.size:
        empty_peak = int(below[np.argmax(smooth[below])])
        between = smooth[empty_peak + 1 : below[-1] + 1]
        if between.size:
            lowest = int(np.argmin(between))
            first, last = _run(between, lowest, between[lowest] * (1 + VALLEY_TOLERANCE), below=True)
            level = float(0.5 * (centres[empty_peak + 1 + first] + centres[empty_peak + 1 + last]))
            rule = 'the valley of the density histogram between empty space and matter'
    level = _strictly_inside(level, lo, hi, values.dtype)
    return level, f'chosen from the density field: {rule}'
