"""Generated scenes, ray cast exactly, for the demo and the tests.

The demo scene: a small textured object in the Blender format (a checkered
ball on a checkered pedestal, with a small second ball), intersected
analytically; each pixel averages `supersample^2` rays over its area, which
is what a mip-NeRF cone integrates. `train.py --config configs/demo.txt`
makes it when it is missing (`make_demo_scene`); `scripts/make_demo.py`
makes it on request; `surface_points` samples its true surface for the
mesh tests.

The unbounded scene (mip-NeRF 360): the same kind of object near the origin,
on a checkered ground plane that reaches the horizon, under a sky at infinity,
seen by cameras all around it, written in the mip-NeRF 360 / LLFF layout
(`images/`, `images_2/`, `images_4/`, `poses_bounds.npy`):
`make_unbounded_scene` writes it (`scripts/make_unbounded.py`),
`unbounded_shade` is its true colour and depth along any ray, and the ground's
checker is integrated analytically over each sub-pixel's footprint, so far
away it averages out as a cone would see it.
"""

import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import torch

import datasets
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
    _make_atomically(out_dir, lambda tmp: _write_demo_scene(tmp, size, supersample, views))
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


# ----------------------------------------------------------------------------
# The unbounded scene (mip-NeRF 360 layout): an object, a ground plane to the
# horizon, a sky at infinity. World z is up; the object's centre is the origin.

UNB_BOX = (np.array([-0.4, -0.4, -0.5]), np.array([0.4, 0.4, -0.1]))  # the pedestal, on the ground
UNB_BALL = (np.array([0.0, 0.0, 0.2]), 0.3)  # resting on the pedestal: the object spans z in [-0.5, 0.5]
UNB_BOX_CELL = 0.2  # the pedestal's checker, on each face
UNB_BOX_COLOURS = (np.array([0.15, 0.35, 0.85]), np.array([0.9, 0.92, 0.95]))
UNB_BALL_COLOURS = (np.array([0.9, 0.2, 0.15]), np.array([0.95, 0.8, 0.2]))
GROUND_Z = -0.5
GROUND_CELL = 0.5  # checker squares of the ground, in world units
GROUND_COLOURS = (np.array([0.55, 0.42, 0.28]), np.array([0.25, 0.5, 0.22]))
GROUND_MAX_PIECES = 256  # see ground_footprint_albedo
SKY_HORIZON = np.array([0.85, 0.88, 0.92])
SKY_ZENITH = np.array([0.25, 0.45, 0.85])
SUN_AZIMUTH, SUN_ELEVATION = np.radians(200.0), np.radians(8.0)  # low: the cameras facing it see it
SUN_DIR = np.array([np.cos(SUN_AZIMUTH), np.sin(SUN_AZIMUTH), np.tan(SUN_ELEVATION)]) * np.cos(SUN_ELEVATION)
SUN_RADIUS = np.radians(4.0)  # its disc, with a soft edge of SUN_EDGE
SUN_EDGE = np.radians(1.0)
SUN_COLOUR = np.array([1.0, 0.95, 0.75])
UNB_FOCAL = 1.25  # focal length / image width: a 1-unit object at distance 4 spans ~0.31 of the view
UNB_AZIMUTH_JITTER = 1.0  # azimuths stratified over 360 degrees, one per view, jittered within its slot
UNB_ELEVATION = (5.0, 30.0)  # degrees above the xy-plane (those below ~22 see the horizon)
UNB_DISTANCE = (3.0, 5.0)
UNB_PERCENTILES = (1.0, 99.0)  # the near and far bounds: of the hit depths of each image
UNB_FACTORS = (2, 4)  # images_2/ and images_4/
KIND_SKY, KIND_GROUND, KIND_BOX, KIND_BALL = 0, 1, 2, 3


def _square_wave(u):
    """+1 on even cells [2k, 2k+1), -1 on odd ones."""
    return 1.0 - 2.0 * (np.floor(u) % 2)


def _filtered_square_wave(u, w):
    """The mean of `_square_wave` over [u - w/2, u + w/2]: exact, through its integral (a triangle wave)."""

    def integral(x):
        return 1.0 - np.abs(x % 2.0 - 1.0)

    safe = np.maximum(w, 1e-9)
    mean = (integral(u + safe / 2) - integral(u - safe / 2)) / safe
    return np.where(w > 1e-9, mean, _square_wave(u))


def ground_albedo(x, y, wx=0.0, wy=0.0):
    """The ground's checker at world (x, y), averaged over a box of widths (wx, wy) centred there.

    The checker is the product of two square waves (+1: GROUND_COLOURS[0], -1: [1]), so its
    mean over an axis-aligned box is the product of their means, each exact. Wide boxes (far
    away, where a pixel covers many squares) tend to the mean of the two colours.
    """
    s = _filtered_square_wave(x / GROUND_CELL, wx / GROUND_CELL) * _filtered_square_wave(
        y / GROUND_CELL, wy / GROUND_CELL
    )
    c0, c1 = GROUND_COLOURS
    return (c0 + c1) / 2 + s[..., None] * ((c0 - c1) / 2)


def ground_footprint_albedo(xy, a, b):
    """The mean ground albedo `[M, 3]` over the parallelograms xy + alpha a + beta b (alpha, beta in
    [-1/2, 1/2]; each `[M, 2]`), the footprints of rays on the ground.

    A footprint, described by its covariance (a a^T + b b^T) / 12, is cut along its major axis into
    n equal pieces, each about as long as it is wide (or a quarter of a square long), n at most
    GROUND_MAX_PIECES; each piece is averaged exactly over the axis-aligned box of its x and y
    variances (`ground_albedo`). Far away, where a footprint is long and thin (grazing), the pieces
    keep its orientation, which a single box would lose (along a diagonal the checker has one colour).
    """
    cov = (a[:, :, None] * a[:, None, :] + b[:, :, None] * b[:, None, :]) / 12
    evals, evecs = np.linalg.eigh(cov)
    major, axis = np.maximum(evals[:, 1], 0), evecs[:, :, 1]
    length = np.sqrt(12 * major)
    n = np.ceil(length / np.maximum(np.sqrt(12 * np.maximum(evals[:, 0], 0)), GROUND_CELL / 4))
    n = 2 ** np.ceil(np.log2(np.clip(n, 1, GROUND_MAX_PIECES))).astype(int)  # a few sizes, each vectorized
    out = np.empty((len(xy), 3))
    for k in np.unique(n):
        sel = n == k
        offsets = ((np.arange(k) + 0.5) / k - 0.5)[None, :, None] * (length[sel, None, None] * axis[sel, None, :])
        centres = xy[sel, None, :] + offsets
        piece = cov[sel] - (1 - 1 / k**2) * major[sel, None, None] * axis[sel, :, None] * axis[sel, None, :]
        wx, wy = np.sqrt(12 * np.maximum(piece[:, 0, 0], 0)), np.sqrt(12 * np.maximum(piece[:, 1, 1], 0))
        out[sel] = ground_albedo(centres[..., 0], centres[..., 1], wx[:, None], wy[:, None]).mean(1)
    return out


def sky_colour(d):
    """The sky along unit directions `[..., 3]`: a function of the direction only (it is at infinity)."""
    e = np.clip(d[..., 2], 0.0, 1.0) ** 0.6
    sky = SKY_HORIZON + e[..., None] * (SKY_ZENITH - SKY_HORIZON)
    angle = np.arccos(np.clip(np.sum(d * SUN_DIR, -1), -1.0, 1.0))
    sun = np.clip((SUN_RADIUS - angle) / SUN_EDGE + 0.5, 0.0, 1.0)[..., None]
    return sky * (1 - sun) + SUN_COLOUR * sun


def unbounded_shade(o, d, dx=None, dy=None):
    """The unbounded scene along rays o + t d (|d| = 1): colour `[..., 3]`, distance t `[...]` (inf: sky)
    and what was hit `[...]` (KIND_SKY, KIND_GROUND, KIND_BOX or KIND_BALL).

    `dx`, `dy` (`[..., 3]`, optional): how the direction changes across the footprint of the ray
    (a sub-pixel's two sides). With them, the ground's checker is averaged over that footprint on the
    ground (`ground_footprint_albedo`); without them the colour is the point sample at the hit. The
    object and the sky are point sampled (the pixel's supersampling averages them).
    """
    o, d = np.broadcast_arrays(np.asarray(o, float), np.asarray(d, float))
    t_ball = _hit_ball(o, d, *UNB_BALL)
    t_box = _hit_box(o, d, *UNB_BOX)
    with np.errstate(divide='ignore', invalid='ignore'):
        t_ground = (GROUND_Z - o[..., 2]) / d[..., 2]
    t_ground = np.where(np.isfinite(t_ground) & (t_ground > 1e-6), t_ground, np.inf)
    t = np.minimum(np.minimum(t_ball, t_box), t_ground)
    kind = np.select([~np.isfinite(t), t == t_ball, t == t_box], [KIND_SKY, KIND_BALL, KIND_BOX], KIND_GROUND).astype(
        np.int8
    )
    p = o + np.where(np.isfinite(t), t, 0)[..., None] * d
    albedo = np.zeros(p.shape)
    normal = np.zeros(p.shape)

    m = kind == KIND_BALL
    q = (p[m] - UNB_BALL[0]) / UNB_BALL[1]
    lon = (np.arctan2(q[:, 1], q[:, 0]) / (2 * np.pi)) % 1.0
    lat = np.arccos(np.clip(q[:, 2], -1, 1)) / np.pi
    albedo[m], normal[m] = _checker(lon * 2, lat, 6, UNB_BALL_COLOURS), q

    m = kind == KIND_BOX
    lo, hi = UNB_BOX
    rel = (p[m] - (lo + hi) / 2) / ((hi - lo) / 2)  # in [-1, 1] on the faces
    axis = np.argmax(np.abs(rel), -1)
    cells = np.floor((p[m] - lo) / UNB_BOX_CELL).astype(int)
    cells[np.arange(len(axis)), axis] = 0  # a checker in the face's own two coordinates
    odd = (cells.sum(-1) % 2 == 1)[:, None]
    albedo[m] = np.where(odd, UNB_BOX_COLOURS[1], UNB_BOX_COLOURS[0])
    normal[m] = np.eye(3)[axis] * np.sign(np.take_along_axis(rel, axis[:, None], -1))

    m = kind == KIND_GROUND
    if dx is not None and m.any():
        dx, dy = (np.broadcast_to(v, d.shape)[m] for v in (dx, dy))
        dm, tm = d[m], t[m][:, None]
        # The hit point o + (GROUND_Z - o_z) / d_z * d moves by a = t (dx - d dx_z / d_z) across the footprint.
        a = tm * (dx - dm * (dx[:, 2:] / dm[:, 2:]))
        b = tm * (dy - dm * (dy[:, 2:] / dm[:, 2:]))
        albedo[m] = ground_footprint_albedo(p[m][:, :2], a[:, :2], b[:, :2])
    else:
        albedo[m] = ground_albedo(p[m][:, 0], p[m][:, 1])
    normal[m] = np.array([0.0, 0.0, 1.0])

    light = AMBIENT + (1 - AMBIENT) * np.clip(np.sum(normal * LIGHT, -1), 0, 1)
    rgb = albedo * light[..., None]
    sky = kind == KIND_SKY
    rgb[sky] = sky_colour(d[sky])
    return rgb, t, kind


def ground_mean_colour():
    """The colour the ground tends to far away: the mean of its checker, lit."""
    return (GROUND_COLOURS[0] + GROUND_COLOURS[1]) / 2 * (AMBIENT + (1 - AMBIENT) * max(LIGHT[2], 0.0))


def unbounded_focal(size):
    return UNB_FOCAL * size


def unbounded_poses(n_views, seed=0):
    """Cameras all around the object, looking at its centre (the origin): `[n_views, 3, 4]` float64,
    OpenGL axes (as pose_utils); azimuths stratified over 360 degrees, in increasing order."""
    rng = np.random.default_rng(seed)
    azimuth = (np.arange(n_views) + 0.5 + UNB_AZIMUTH_JITTER * rng.uniform(-0.5, 0.5, n_views)) * (360.0 / n_views)
    elevation = rng.uniform(*UNB_ELEVATION, n_views)
    distance = rng.uniform(*UNB_DISTANCE, n_views)
    c2w = pose_utils.spherical_pose(azimuth, elevation, 1.0, dtype=torch.float64).numpy()
    c2w[:, :, 3] *= distance[:, None]
    return c2w


def render_unbounded(c2w, size, focal=None, supersample=4):
    """A square image of the unbounded scene from pose `[3, 4]` (OpenGL axes).

    Each pixel averages `supersample^2` rays spread over its area, each ray's ground colour
    averaged over its own sub-pixel footprint. Returns the colour `[size, size, 3]`, and per ray
    `[size, size, supersample^2]` its depth along the optical axis (as LLFF's bounds; inf: sky)
    and what it hit (KIND_*).
    """
    focal = unbounded_focal(size) if focal is None else focal
    rot, origin = c2w[:3, :3], c2w[:3, 3]
    sub = (np.arange(supersample) + 0.5) / supersample
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    rgb = np.zeros((size, size, 3))
    depth = np.zeros((size, size, supersample**2))
    kind = np.zeros((size, size, supersample**2), np.int8)
    step_x = rot[:, 0] / (focal * supersample)  # a sub-pixel to the right, then down
    step_y = -rot[:, 1] / (focal * supersample)
    for k, (sy, sx) in enumerate((sy, sx) for sy in sub for sx in sub):
        dirs = np.stack([(x + sx - 0.5 * size) / focal, -(y + sy - 0.5 * size) / focal, -np.ones(x.shape)], -1)
        dirs = dirs @ rot.T
        norm = np.linalg.norm(dirs, axis=-1, keepdims=True)
        colour, t, kind[..., k] = unbounded_shade(origin, dirs / norm, step_x / norm, step_y / norm)
        rgb += colour
        depth[..., k] = t / norm[..., 0]  # the camera-space depth: dirs is -1 along the optical axis
    return rgb / supersample**2, depth, kind


def depth_bounds(depth):
    """(near, far) of one image from its rays' depths: percentiles UNB_PERCENTILES of the finite ones
    (the sky excluded), as COLMAP/LLFF takes them from the depths of the points an image sees."""
    hit = depth[np.isfinite(depth)]
    if hit.size == 0:
        raise ValueError('the image sees only sky: no depth bounds')
    return np.percentile(hit, UNB_PERCENTILES)


def _to_uint8_bgr(rgb):
    return np.round(np.clip(rgb[..., ::-1], 0, 1) * 255).astype(np.uint8)


def _make_atomically(out_dir, write):
    """`write(tmp)` fills a fresh temporary sibling of `out_dir`, then renamed to it: two makers at once
    each write their own; the first rename wins, the other's copy is dropped."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir.rstrip('/')) + '.partial.', dir=parent)
    try:
        write(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isdir(out_dir):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_unbounded_scene(out_dir, size=96, n_views=64, supersample=4, seed=0, verbose=True):
    """Write the unbounded scene to `out_dir` in the mip-NeRF 360 layout (atomically, as `make_demo_scene`).

    `images/img_000.png`... (`size` x `size` RGB), `images_2/`, `images_4/` (area averages of the
    rendered images, before rounding to 8 bits) and `poses_bounds.npy` (see `datasets.to_poses_bounds`;
    focal `unbounded_focal(size)` at the full size). Returns the cameras `[n_views, 3, 4]` (OpenGL).
    """
    if size % max(UNB_FACTORS):
        raise ValueError(f'size {size} must be a multiple of {max(UNB_FACTORS)} (images_{max(UNB_FACTORS)}/)')
    c2w = unbounded_poses(n_views, seed)

    def write(tmp):
        folders = {1: 'images', **{f: f'images_{f}' for f in UNB_FACTORS}}
        for folder in folders.values():
            os.makedirs(os.path.join(tmp, folder))
        bounds = []
        width = len(str(n_views - 1)) if n_views > 1000 else 3
        for i, pose in enumerate(c2w):
            rgb, depth, _ = render_unbounded(pose, size, supersample=supersample)
            bounds.append(depth_bounds(depth))
            for f, folder in folders.items():
                small = rgb.reshape(size // f, f, size // f, f, 3).mean((1, 3))
                path = os.path.join(tmp, folder, f'img_{i:0{width}d}.png')
                if not cv2.imwrite(path, _to_uint8_bgr(small)):
                    raise OSError(f'could not write {path}')
        rows = datasets.to_poses_bounds(c2w, size, size, unbounded_focal(size), bounds)
        np.save(os.path.join(tmp, 'poses_bounds.npy'), rows)

    _make_atomically(out_dir, write)
    if verbose:
        print(f'unbounded scene written to {out_dir} ({n_views} views, {size}x{size}, images_2/ and images_4/)')
    return c2w
