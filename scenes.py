"""Generated scenes, ray cast exactly, for the demo and the tests.

The demo scene: a small textured object in the Blender format (a checkered
ball on a checkered pedestal, with a small second ball), intersected
analytically; each pixel averages `supersample^2` rays over its area, which
is what a mip-NeRF cone integrates. `train.py --config configs/demo.txt`
makes it when it is missing (`make_demo_scene`); `scripts/make_demo.py`
makes it on request; `surface_points` samples its true surface for the
mesh tests.
"""

import json
import os
import shutil
import tempfile

import cv2
import numpy as np

import pose_utils

CAMERA_ANGLE_X = 0.6911112070083618  # as nerf_synthetic
CAMERA_RADIUS = 4.0
LIGHT = np.array([0.4, 0.3, 1.0]) / np.linalg.norm([0.4, 0.3, 1.0])
AMBIENT = 0.35

# Primitives: (centre, radius) balls and one axis-aligned box (the pedestal).
BALL = (np.array([0.0, 0.0, 0.25]), 0.6)
SMALL_BALL = (np.array([0.5, -0.5, -0.12]), 0.18)
BOX = (np.array([-0.8, -0.8, -0.6]), np.array([0.8, 0.8, -0.3]))
SPLITS = {'train': (100, 0), 'val': (8, 1), 'test': (25, 2)}  # views, seed


def _hit_ball(o, d, centre, radius):
    """Nearest positive t of rays o + t d (|d| = 1) with a ball; inf if missed."""
    oc = o - centre
    b = np.sum(oc * d, -1)
    c = np.sum(oc * oc, -1) - radius**2
    disc = b * b - c
    sq = np.sqrt(np.maximum(disc, 0))
    t = np.where(-b - sq > 1e-6, -b - sq, -b + sq)
    return np.where((disc >= 0) & (t > 1e-6), t, np.inf)


def _hit_box(o, d, lo, hi):
    with np.errstate(divide='ignore', invalid='ignore'):
        inv = 1.0 / d
        t0, t1 = (lo - o) * inv, (hi - o) * inv
    tmin = np.nanmax(np.minimum(t0, t1), -1)
    tmax = np.nanmin(np.maximum(t0, t1), -1)
    return np.where((tmax >= tmin) & (tmin > 1e-6), tmin, np.inf)


def _checker(u, v, n, colours):
    idx = (np.floor(u * n).astype(int) + np.floor(v * n).astype(int)) % 2
    return np.where(idx[..., None] == 0, colours[0], colours[1])


def shade(o, d):
    """Colour `[..., 3]` and hit mask `[...]` of unit-direction rays."""
    t_ball = _hit_ball(o, d, *BALL)
    t_small = _hit_ball(o, d, *SMALL_BALL)
    t_box = _hit_box(o, d, *BOX)
    t = np.minimum(np.minimum(t_ball, t_small), t_box)
    hit = np.isfinite(t)
    p = o + np.where(hit, t, 0)[..., None] * d
    albedo = np.zeros(p.shape)
    normal = np.zeros(p.shape)

    m = hit & (t == t_ball)
    q = (p - BALL[0]) / BALL[1]
    lon = (np.arctan2(q[..., 1], q[..., 0]) / (2 * np.pi)) % 1.0
    lat = np.arccos(np.clip(q[..., 2], -1, 1)) / np.pi
    ball_albedo = _checker(lon * 2, lat, 6, (np.array([0.9, 0.2, 0.15]), np.array([0.95, 0.8, 0.2])))
    albedo[m], normal[m] = ball_albedo[m], q[m]

    m = hit & (t == t_small) & (t < t_ball)
    albedo[m], normal[m] = np.array([0.6, 0.2, 0.8]), ((p - SMALL_BALL[0]) / SMALL_BALL[1])[m]

    m = hit & (t == t_box) & (t < t_ball) & (t < t_small)
    lo, hi = BOX
    rel = (p - (lo + hi) / 2) / ((hi - lo) / 2)  # in [-1, 1] on the faces
    axis = np.argmax(np.abs(rel), -1)
    box_normal = np.eye(3)[axis] * np.sign(np.take_along_axis(rel, axis[..., None], -1))
    top = _checker(
        (p[..., 0] - lo[0]) / (hi[0] - lo[0]),
        (p[..., 1] - lo[1]) / (hi[1] - lo[1]),
        4,
        (np.array([0.15, 0.35, 0.85]), np.array([0.9, 0.92, 0.95])),
    )
    side = np.array([0.3, 0.6, 0.35])
    box_albedo = np.where((axis == 2)[..., None], top, side)
    albedo[m], normal[m] = box_albedo[m], box_normal[m]

    light = AMBIENT + (1 - AMBIENT) * np.clip(np.sum(normal * LIGHT, -1), 0, 1)
    return albedo * light[..., None], hit


def surface_points(n, seed=0):
    """About n points spread uniformly over the surfaces the cameras can see, `[M, 3]`.

    The balls and the pedestal's top and sides, minus the parts hidden inside
    another primitive; the pedestal's bottom is never seen (all cameras are
    above it) and is left out.
    """
    rng = np.random.default_rng(seed)
    (c0, r0), (c1, r1) = BALL, SMALL_BALL
    lo, hi = BOX
    size = hi - lo
    areas = {
        'ball': 4 * np.pi * r0**2,
        'small': 4 * np.pi * r1**2,
        'top': size[0] * size[1],
        'sides': 2 * (size[0] + size[1]) * size[2],
    }
    total = sum(areas.values())
    pts = []
    for name, area in areas.items():
        k = int(round(n * area / total))
        if name in ('ball', 'small'):
            c, r = (c0, r0) if name == 'ball' else (c1, r1)
            v = rng.normal(size=(k, 3))
            pts.append(c + r * v / np.linalg.norm(v, axis=1, keepdims=True))
        elif name == 'top':
            pts.append(np.stack([rng.uniform(lo[0], hi[0], k), rng.uniform(lo[1], hi[1], k), np.full(k, hi[2])], 1))
        else:  # perimeter position along the four sides, then height
            s = rng.uniform(0, 2 * (size[0] + size[1]), k)
            z = rng.uniform(lo[2], hi[2], k)
            x = np.select(
                [s < size[0], s < size[0] + size[1], s < 2 * size[0] + size[1]],
                [lo[0] + s, np.full(k, hi[0]), hi[0] - (s - size[0] - size[1])],
                np.full(k, lo[0]),
            )
            y = np.select(
                [s < size[0], s < size[0] + size[1], s < 2 * size[0] + size[1]],
                [np.full(k, lo[1]), lo[1] + (s - size[0]), np.full(k, hi[1])],
                hi[1] - (s - 2 * size[0] - size[1]),
            )
            pts.append(np.stack([x, y, z], 1))
    p = np.concatenate(pts)
    eps = 1e-9
    inside_box = np.all((p > lo + eps) & (p < hi - eps), axis=1)
    inside_ball = np.linalg.norm(p - c0, axis=1) < r0 - eps
    inside_small = np.linalg.norm(p - c1, axis=1) < r1 - eps
    return p[~(inside_box | inside_ball | inside_small)]


def render(c2w, size, supersample=4):
    """An RGBA float image `[size, size, 4]` (straight alpha) from pose `[3, 4]`."""
    focal = 0.5 * size / np.tan(0.5 * CAMERA_ANGLE_X)
    sub = (np.arange(supersample) + 0.5) / supersample
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    premult = np.zeros((size, size, 3))
    alpha = np.zeros((size, size))
    for sy in sub:
        for sx in sub:
            dirs = np.stack(
                [(x + sx - 0.5 * size) / focal, -(y + sy - 0.5 * size) / focal, -np.ones_like(x, float)], -1
            )
            dirs = dirs @ c2w[:3, :3].T
            dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
            rgb, hit = shade(np.broadcast_to(c2w[:3, 3], dirs.shape), dirs)
            premult += rgb * hit[..., None]
            alpha += hit
    premult /= supersample**2
    alpha /= supersample**2
    rgb = np.where(alpha[..., None] > 0, premult / np.maximum(alpha[..., None], 1e-8), 0)
    return np.concatenate([rgb, alpha[..., None]], -1)


def split_poses(split, n=None):
    n_default, seed = SPLITS[split]
    n = n_default if n is None else n
    rng = np.random.default_rng(seed)
    azimuth = rng.uniform(0, 360, n)
    elevation = rng.uniform(10, 70, n)
    return pose_utils.spherical_pose(azimuth, elevation, CAMERA_RADIUS).double().numpy()


def make_demo_scene(out_dir, size=100, supersample=4, views=None, verbose=True):
    """Write the demo scene to `out_dir` (atomically: a temporary folder, then a rename).

    `views` maps a split to its number of views (default: SPLITS). Two
    processes making the same scene at once each write their own temporary
    folder; the first rename wins and the other's copy is dropped.
    """
    views = {s: n for s, (n, _) in SPLITS.items()} if views is None else views
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir.rstrip('/')) + '.partial.', dir=parent)
    try:
        _write_demo_scene(tmp, size, supersample, views)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isdir(out_dir):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(
            f'demo scene written to {out_dir} ({size}x{size}, '
            + ', '.join(f'{n} {s}' for s, n in views.items())
            + ' views)'
        )


def _write_demo_scene(tmp, size, supersample, views):
    for split in SPLITS:
        os.makedirs(os.path.join(tmp, split))
        frames = []
        for i, c2w in enumerate(split_poses(split, views[split])):
            rgba = render(c2w, size, supersample)
            bgra = np.round(np.clip(rgba[..., [2, 1, 0, 3]], 0, 1) * 255).astype(np.uint8)
            cv2.imwrite(os.path.join(tmp, split, f'r_{i}.png'), bgra)
            frames.append(
                {'file_path': f'./{split}/r_{i}', 'transform_matrix': np.concatenate([c2w, [[0, 0, 0, 1]]]).tolist()}
            )
        with open(os.path.join(tmp, f'transforms_{split}.json'), 'w') as f:
            json.dump({'camera_angle_x': CAMERA_ANGLE_X, 'frames': frames}, f, indent=1)
