"""Scene loaders (Blender, LLFF, Multicam, mip-NeRF 360, captures) and the on-device training-ray sampler.

    data = get_dataset('blender', 'data/nerf_synthetic/lego', 'train', factor=0)
    data.images            # float32 [N, H, W, 3] in [0, 1] (a list for Multicam,
                           # whose images differ in size)
    data.h, data.w, data.focal
    data.rays_of_image(0)  # Rays of [H, W, C] tensors
    sampler = RaySampler(data, batch_size=4096, device='cuda', seed=0)
    rays, target = sampler.sample()  # generated on the device, no DataLoader

Every camera is a pix2cam `[3, 3]` and a cam2world `[3, 4]` matrix (see
`ray_utils.pixel_rays`), so all loaders share one ray generator; LLFF scenes
add the NDC warp of the official release. Unbounded scenes (360, capture) have
ordinary pinhole rays in a world normalized as multinerf's
(`pose_utils.transform_poses_pca`).
"""

import dataclasses
import errno
import functools
import json
import math
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

import cli
import pose_utils
import ray_utils

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the fix."""


# ----------------------------------------------------------------------------
# The datasets: where they live and their defaults (the official blender.gin /
# llff.gin / multiblender.gin; multinerf's 360.gin). Flags and config files override the defaults.


@dataclasses.dataclass(frozen=True)
class Dataset:
    folder: str  # under --data_dir
    script: str  # the script that downloads it
    scene: str  # the default --scene
    defaults: dict  # per-dataset flag defaults


# Multicam draws from all images: its images differ in size, and the official
# single_image batching indexes every image with the first one's pixel count.
# The demo does too: its runs are a few thousand steps, where batches drawn from
# one view at a time leave colours visibly behind.
_BLENDER = dict(
    white_bkgd=True,
    near=2.0,
    far=6.0,
    factor=0,
    ray_shape='cone',
    density_noise=0.0,
    lindisp=False,
    batching='single_image',
)
# Unbounded scenes (mip-NeRF 360 and captures): multinerf's 360.gin. near and far are in the units of
# pose_utils.transform_poses_pca (the cameras inside the unit ball), as multinerf: not scaled.
_UNBOUNDED = dict(_BLENDER, white_bkgd=False, near=0.2, far=1e6, factor=4, batching='all_images')
DATASETS = {
    'blender': Dataset('nerf_synthetic', 'scripts/download_blender.sh', 'lego', _BLENDER),
    'llff': Dataset(
        'nerf_llff_data',
        'scripts/download_llff.sh',
        'fern',
        dict(
            white_bkgd=False,
            near=0.0,
            far=1.0,
            factor=4,
            ray_shape='cylinder',
            density_noise=1.0,
            lindisp=False,
            batching='all_images',
        ),
    ),
    'multicam': Dataset(
        'nerf_multiscale', 'scripts/download_multicam.sh', 'lego', dict(_BLENDER, batching='all_images')
    ),
    'demo': Dataset('demo', None, '', dict(_BLENDER, batching='all_images')),
    '360': Dataset('360_v2', 'scripts/download_360.sh', 'garden', _UNBOUNDED),
    # No download: a capture is the user's own (the fox is instant-ngp's data/nerf/fox). Its images
    # (phones: 1080x1920 or so) are halved: at most about 1000 pixels a side, near LLFF's 1008x756.
    'capture': Dataset(
        'captures',
        "instant-ngp's colmap2nerf.py or nerfstudio's ns-process-data on your capture",
        'fox',
        dict(_UNBOUNDED, factor=2),
    ),
}


def apply_defaults(cfg):
    """Fill the flags left unset (None) with the dataset's defaults; also base_dir and log_dir."""
    d = DATASETS[cfg.dataset_name]
    for k, v in d.defaults.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.scene is None:  # a scene folder given by --base_dir names the run after itself
        cfg.scene = os.path.basename(os.path.normpath(cfg.base_dir)) if cfg.base_dir else d.scene
    if cfg.base_dir is None:
        cfg.base_dir = os.path.join(cfg.data_dir, d.folder, *([cfg.scene] if cfg.scene else []))
    if cfg.log_dir is None:
        cfg.log_dir = os.path.join('log', cfg.scene or cfg.dataset_name)
    return cfg


# ----------------------------------------------------------------------------
# Images.


def _path_problem(path, noun='a file'):
    """Why `path` is not a readable file (or, with noun='a folder', a folder): (what it is, the fix), or None.

    Only a path that is truly absent is 'is missing' (its fix None: the caller's); a folder, a broken
    symbolic link, a link loop or an unreadable file each say so.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return 'is a symbolic-link loop', f'replace the link with the real {noun.split()[-1]}'
        if os.path.islink(path):
            return f'is a broken symbolic link (to {os.readlink(path)})', 'restore its target'
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return 'is missing', None
        return f'cannot be accessed ({e.strerror})', 'check its permissions'
    if noun == 'a folder':
        return None if stat.S_ISDIR(st.st_mode) else ('is a file, not a folder', 'replace it with the folder')
    if stat.S_ISDIR(st.st_mode):
        return f'is a folder, not {noun}', f'replace it with {noun}'
    if not stat.S_ISREG(st.st_mode):
        return 'is not a regular file (a pipe, socket or device)', f'replace it with {noun}'
    if not os.access(path, os.R_OK):
        return 'is not readable (permission denied)', 'make it readable (chmod a+r)'
    return None


def _check_path(path, label, noun, missing_fix):
    """Raise a DataError '<label> <what it is>: <fix>' unless `path` is a readable file (or folder)."""
    problem = _path_problem(path, noun)
    if problem is not None:
        what, fix = problem
        raise DataError(f'{label} {what}: {fix or missing_fix}' + (f', or {missing_fix}' if fix else ''))


def read_image(path):
    """An image file as float32 `[H, W, C]` in [0, 1] (RGB or RGBA)."""
    _check_path(path, f'image {path}', 'an image', 're-download or regenerate the scene')
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f'image {path} is unreadable (truncated or not an image): re-download the scene')
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., [2, 1, 0, 3]] if img.shape[-1] == 4 else img[..., [2, 1, 0]]
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return img.astype(np.float32) / scale


def area_downsample(img, factor):
    """Average each factor x factor block of pixels: `[H, W, C]` -> `[H//f, W//f, C]`."""
    if factor <= 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    if h < 1 or w < 1:
        raise DataError(
            f'--factor {factor} is larger than the {img.shape[1]}x{img.shape[0]} images: pass a smaller one'
        )
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def composite(rgba, white_bkgd):
    """RGBA -> RGB over a white (or black) background; RGB passes through."""
    if rgba.shape[-1] == 3:
        return rgba
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return rgb * alpha + (1.0 - alpha) if white_bkgd else rgb * alpha


def _read_all(paths, fn):
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, paths))


def _same_size(sizes, files):
    """Refuse images of one split whose (H, W) differ (as read, before any --factor)."""
    first = tuple(sizes[0])
    for path, size in zip(files, sizes):
        if tuple(size) != first:
            raise DataError(
                f'image {path} has size {tuple(size)}, but {files[0]} has {first}: '
                'all images of a split must have the same size'
            )


def _load_images(files, white_bkgd, factor=0):
    """The images of one split, composited and area-downsampled, as one float32 `[N, H, W, 3]` tensor.

    Sizes are compared as read, so that --factor cannot hide a mismatch (800x800 and 801x801 both
    become 400x400 at --factor 2). With `white_bkgd`, images without alpha are noted on stdout.
    """

    def one(path):
        img = read_image(path)
        return img.shape[:2], img.shape[-1] == 4, area_downsample(composite(img, white_bkgd), factor)

    read = _read_all(files, one)
    _same_size([size for size, _, _ in read], files)
    if white_bkgd:
        _note_no_alpha([alpha for _, alpha, _ in read], files)
    return torch.from_numpy(np.stack([img for _, _, img in read]))


def _note_no_alpha(has_alpha, files):
    """One note line when some images of a white-background split have no alpha channel."""
    k = has_alpha.count(False)
    if k:
        folder = os.path.commonpath([os.path.dirname(f) or '.' for f in files])
        print(
            f'note: {k} of {len(files)} images in {folder} {"has" if k == 1 else "have"} no alpha channel: '
            'used as they are, the white background is not composited onto them'
        )


def _short(v, n=60):
    """repr(v) cut to n characters, for messages."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + '...'


def _check_poses(c2w, field, where, fix):
    """Refuse camera-to-world poses `[N, 3, >=3]` with NaN or inf, or whose 3x3 rotation is degenerate or mirrored.

    `where(i)` names camera i (file, index, image) in the message; `fix` ends it.
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    finite = np.isfinite(c2w).reshape(len(c2w), -1).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise DataError(f'{where(i)} has NaN or inf in its {field}: {fix}')
    det = np.linalg.det(c2w[:, :3, :3])
    for i, d in enumerate(det):
        if abs(d) < 1e-6:
            raise DataError(
                f'{where(i)} has a degenerate rotation: the 3x3 rotation of its {field} has determinant {d:.3g} '
                f'(all zero or singular): {fix}'
            )
        if d < 0:
            raise DataError(
                f'{where(i)} is a mirrored camera: the 3x3 rotation of its {field} has determinant {d:.3g} < 0, '
                f'so it would train on mirrored geometry (a rotation has determinant +1): {fix}'
            )


def _load_json(path):
    _check_path(path, path, 'a file', 're-download the scene')
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f'{path} is not valid JSON ({e}): re-download the scene') from None
    except OSError as e:
        raise DataError(f'{path} cannot be read ({e.strerror or e}): re-download the scene') from None


# ----------------------------------------------------------------------------
# Scenes and rays.


class SceneData:
    """Images and cameras of one split of a scene.

    Attributes:
      images: float32 `[N, H, W, 3]` tensor in [0, 1], or a list of
        `[H_i, W_i, 3]` tensors when the sizes differ (Multicam).
      sizes: [(H_i, W_i)]; h, w, focal: those of image 0.
      pix2cam `[N, 3, 3]`, cam2world `[N, 3, 4]`: float32 cameras.
      near, far, lossmult: float32 `[N]` per-image ray attributes.
      ndc: None, or dict(focal, w, h) of the NDC warp (LLFF).
      labels: `[N]` integer scale labels (Multicam; zeros otherwise).
      bounds: `[N, 2]` scene depth bounds (LLFF and 360, after scaling), or None.
      all_cam2world: cam2world of every view of the scene, all splits
        (render paths are built from it).
    """

    def __init__(
        self,
        images,
        pix2cam,
        cam2world,
        near,
        far,
        lossmult=None,
        ndc=None,
        labels=None,
        bounds=None,
        all_cam2world=None,
    ):
        self.images = images
        n = len(images)
        self.sizes = [tuple(im.shape[:2]) for im in images]
        self.h, self.w = self.sizes[0]
        self.pix2cam, self.cam2world = pix2cam, cam2world
        self.focal = float(1 / pix2cam[0, 0, 0])

        def full(v):
            return torch.full((n,), float(v)) if np.isscalar(v) else torch.as_tensor(v, dtype=torch.float32)

        self.near, self.far = full(near), full(far)
        self.lossmult = full(1.0) if lossmult is None else full(lossmult)
        self.ndc = ndc
        self.labels = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels)
        self.bounds = bounds
        self.all_cam2world = cam2world if all_cam2world is None else all_cam2world

    def __len__(self):
        return len(self.images)

    def rays_of_image(self, i):
        """Rays of every pixel of image i: `Rays` of `[H, W, C]` tensors."""
        h, w = self.sizes[i]
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        return make_rays(
            self.pix2cam[i], self.cam2world[i], x, y, h, w, self.near[i], self.far[i], self.lossmult[i], self.ndc
        )


def make_rays(pix2cam, cam2world, x, y, h, w, near, far, lossmult, ndc=None):
    """Rays of pixels (x, y) of images of size (h, w); per-camera tensors broadcast to `[...]`.

    With `ndc` (LLFF), origins and directions are warped into normalized
    device coordinates and the radius is, as in the official release, the
    mean distance from the NDC origin to its row and column neighbours'
    times 2/sqrt(12). The view directions stay the world-space directions
    (unnormalized, as the official release passes them).
    """
    origins, directions, viewdirs, radii = ray_utils.pixel_rays(pix2cam, cam2world, x, y)
    if ndc is not None:

        def ndc_origin(xx, yy):
            o, d, _, _ = ray_utils.pixel_rays(pix2cam, cam2world, xx, yy)
            return ray_utils.convert_to_ndc(o, d, ndc['focal'], ndc['w'], ndc['h'])[0]

        # The last row and column take their neighbour on the other side.
        x_next = torch.where(x + 1 < w, x + 1, x - 1)
        y_next = torch.where(y + 1 < h, y + 1, y - 1)
        viewdirs = directions
        origins, directions = ray_utils.convert_to_ndc(origins, directions, ndc['focal'], ndc['w'], ndc['h'])
        dx = torch.linalg.norm(origins - ndc_origin(x, y_next), dim=-1, keepdim=True)
        dy = torch.linalg.norm(origins - ndc_origin(x_next, y), dim=-1, keepdim=True)
        radii = 0.5 * (dx + dy) * (2 / math.sqrt(12))
    ones = torch.ones_like(radii)

    def as_col(v):
        return torch.as_tensor(v, dtype=radii.dtype, device=radii.device)[..., None] * ones

    return ray_utils.Rays(origins, directions, viewdirs, radii, as_col(lossmult), as_col(near), as_col(far))


# ----------------------------------------------------------------------------
# Blender (nerf_synthetic) and the demo scene.


def load_blender(base_dir, split, factor=0, white_bkgd=True, near=2.0, far=6.0, **_):
    """The NeRF synthetic (Blender) format: transforms_{split}.json + RGBA PNGs."""
    meta_path = os.path.join(base_dir, f'transforms_{split}.json')
    problem = _path_problem(meta_path)
    if problem is not None and os.path.isdir(base_dir):
        entries = sorted(f for f in os.listdir(base_dir) if f.startswith('transforms_') and f.endswith('.json'))
        readable = [f for f in entries if _path_problem(os.path.join(base_dir, f)) is None]
        splits = [f[len('transforms_') : -len('.json')] for f in readable]  # only those that really are files
        what, fix = problem
        if what == 'is missing':
            if not entries:
                raise DataError(
                    f'{base_dir} is not a Blender scene (no transforms_*.json): check --dataset_name and --base_dir'
                )
            if not splits:
                raise DataError(
                    f'{meta_path} is missing, and {", ".join(entries)} {"is" if len(entries) == 1 else "are"} '
                    'not a readable file: re-download the scene'
                )
            raise DataError(
                f'{meta_path} is missing; the scene has the splits {", ".join(splits)}: '
                're-download it if one should be there'
            )
        others = f'the scene has the splits {", ".join(splits)}' if splits else 'no other split is readable'
        raise DataError(f'{meta_path} {what}; {others}: {fix}, or re-download the scene')
    meta = _load_json(meta_path)
    try:
        camera_angle_x = float(meta['camera_angle_x'])
        frames = meta['frames']
        paths = [f['file_path'] for f in frames]
        cams = np.array([f['transform_matrix'] for f in frames], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f'{meta_path} is malformed ({type(e).__name__}: {e}): '
            'it needs camera_angle_x and frames with file_path and a 4x4 transform_matrix'
        ) from None
    if len(paths) == 0 or cams.shape[1:] != (4, 4):
        raise DataError(f'{meta_path} is malformed: it needs at least one frame with a 4x4 transform_matrix')
    if not 0 < camera_angle_x < math.pi:  # NaN too
        raise DataError(
            f'{meta_path}: camera_angle_x is {camera_angle_x}, but it must be the horizontal field of view in '
            'radians, between 0 and pi: fix it or re-download the scene'
        )
    for i, p in enumerate(paths):
        if not isinstance(p, str):
            raise DataError(
                f'{meta_path}: frame {i} has file_path {_short(p)}, not a string: set it to the image path '
                f'relative to the scene (such as "./{split}/r_{i}") or re-download the scene'
            )
    _check_poses(
        cams,
        'transform_matrix',
        lambda i: f'{meta_path}: frame {i} ({paths[i]})',
        'fix the frame or re-download the scene',
    )
    files = [os.path.join(base_dir, p + ('' if p.endswith('.png') else '.png')) for p in paths]

    images = _load_images(files, white_bkgd, factor)
    n, h, w = images.shape[:3]
    focal = 0.5 * w / np.tan(0.5 * camera_angle_x)
    pix2cam = ray_utils.pinhole_pix2cam(focal, w, h).expand(n, 3, 3).contiguous()
    return SceneData(images, pix2cam, torch.from_numpy(cams[:, :3, :4].astype(np.float32)), near, far)


# ----------------------------------------------------------------------------
# LLFF (nerf_llff_data).


def llff_image_dir(base_dir, factor):
    """images_{factor}/, made from images/ by area averaging and cached if missing."""
    name = f'images_{factor}' if factor > 1 else 'images'
    folder = os.path.join(base_dir, name)
    problem = _path_problem(folder, 'a folder')
    if problem is None:
        return folder
    what, fix = problem
    if what != 'is missing':
        raise DataError(f'{folder} {what}: {fix}, or re-download the scene')
    source = os.path.join(base_dir, 'images')
    if factor <= 1:  # the full resolution was asked for: name the downsampled folders there are
        found = sorted(
            (int(m.group(1)), d)
            for d in os.listdir(base_dir)
            if (m := re.fullmatch(r'images_(\d+)', d)) and os.path.isdir(os.path.join(base_dir, d))
        )
        if not found:
            raise DataError(
                f'{folder} is missing (--factor {factor} reads the full-resolution images): re-download the scene'
            )
        flags = [f'--factor {k}' for k, _ in found]
        flags = flags[0] if len(flags) == 1 else ', '.join(flags[:-1]) + ' or ' + flags[-1]
        raise DataError(
            f'{folder} is missing (--factor {factor} reads the full-resolution images); '
            f'{os.path.basename(os.path.normpath(base_dir))} has {", ".join(d for _, d in found)}: pass {flags}'
        )
    if not os.path.isdir(source):
        raise DataError(f'{folder} is missing and there is no {source} to make it from: re-download the scene')
    files = sorted(f for f in os.listdir(source) if f.lower().endswith(IMAGE_EXTENSIONS))
    print(f'making {folder} from {len(files)} images in {source} (once)')

    def shrink(f):
        img = cv2.imread(os.path.join(source, f), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DataError(f'image {os.path.join(source, f)} is unreadable: re-download the scene')
        if img.shape[0] < factor or img.shape[1] < factor:
            raise DataError(
                f'--factor {factor} is larger than the {img.shape[1]}x{img.shape[0]} images in {source}: '
                'pass a smaller one'
            )
        small = cv2.resize(img, (img.shape[1] // factor, img.shape[0] // factor), interpolation=cv2.INTER_AREA)
        out = os.path.join(tmp, os.path.splitext(f)[0] + '.png')
        if not cv2.imwrite(out, small):
            raise OSError(f'could not write {out}')

    try:
        with cli.atomic_output(folder, folder=True) as tmp:  # images_N.partial/, renamed when complete
            _read_all(files, shrink)
    except OSError as e:
        raise DataError(
            f'{folder}: could not make it ({e.strerror or e}): free some space or make the scene folder writable'
        ) from None
    return folder


def load_llff_poses(base_dir, factor, num_images=None, names=None):
    """Poses and bounds of poses_bounds.npy, scaled and re-centred as the official release.

    Returns cam2world `[N, 3, 4]` (OpenGL axes), bounds `[N, 2]` and the
    focal length at `factor` (float64 numpy). `names` (the image files, optional)
    name the image of a bad row in messages.
    """
    poses, bounds, focal = read_poses_bounds(base_dir, factor, num_images, names)
    scale = 1.0 / (bounds.min() * 0.75)
    poses[:, :, 3] *= scale
    bounds *= scale
    poses = pose_utils.recenter_poses(torch.from_numpy(poses)).numpy()
    return poses, bounds, focal


def read_poses_bounds(base_dir, factor, num_images=None, names=None):
    """Poses and bounds of poses_bounds.npy as stored (COLMAP's world), checked; camera axes made OpenGL's.

    Returns cam2world `[N, 3, 4]`, bounds `[N, 2]` and the focal length at `factor` (float64 numpy).
    """
    path = os.path.join(base_dir, 'poses_bounds.npy')
    _check_path(path, path, 'a file', 're-download the scene')
    if os.path.getsize(path) == 0:
        raise DataError(f'{path} is empty (0 bytes): re-download the scene')
    try:
        arr = np.load(path).astype(np.float64)
    except Exception as e:  # any: np.load raises EOFError, ValueError, OSError, pickle errors...
        why = ' '.join(f'{type(e).__name__}: {e}'.split())
        raise DataError(f'{path} is not a numpy array ({why}): re-download the scene') from None
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise DataError(f'{path} has shape {arr.shape}, expected [N, 17] (a 3x5 pose and 2 bounds per image)')
    if num_images is not None and arr.shape[0] != num_images:
        raise DataError(f'{path} has {arr.shape[0]} poses but there are {num_images} images')

    def where(i):
        return f'{path}: image {i}' + (f' ({os.path.basename(names[i])})' if names is not None else '')

    fix = 're-run COLMAP (LLFF imgs2poses.py) or re-download the scene'
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise DataError(f'{where(i)} has NaN or inf in its row (its pose or bounds): {fix}')
    for i, (lo, hi) in enumerate(arr[:, 15:]):
        if lo <= 0 or hi <= 0:
            raise DataError(f'{where(i)} has non-positive depth bounds ({lo:g}, {hi:g}); they must be positive: {fix}')
    poses = arr[:, :15].reshape(-1, 3, 5)
    for i, f in enumerate(poses[:, 2, 4]):
        if f <= 0:
            raise DataError(f'{where(i)} has focal length {f:g} (poses[:, 2, 4]); it must be positive: {fix}')
    _check_poses(poses[:, :, :4], 'pose', where, fix)
    bounds = arr[:, 15:].copy()
    focal = poses[0, 2, 4] / max(factor, 1)
    # LLFF stores [down, right, back]; NeRF uses [right, up, back].
    poses = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:4]], -1)
    return poses, bounds, focal


def to_poses_bounds(c2w, height, width, focal, bounds):
    """poses_bounds.npy rows `[N, 17]`: the inverse of `read_poses_bounds`' conversion.

    Each row is a 3x5 matrix [down, right, back, centre, (h, w, focal)] (LLFF's axes; `c2w` has
    OpenGL's [right, up, back]) flattened row by row, then the (near, far) depth bounds.
    """
    c2w = np.asarray(c2w, np.float64)
    n = len(c2w)
    llff = np.concatenate([-c2w[:, :, 1:2], c2w[:, :, 0:1], c2w[:, :, 2:4]], -1)
    hwf = np.broadcast_to(np.array([height, width, focal], np.float64)[:, None], (n, 3, 1))
    return np.concatenate([np.concatenate([llff, hwf], -1).reshape(n, 15), np.asarray(bounds, np.float64)], 1)


def _llff_files(base_dir, factor):
    """The image folder at `factor` (see llff_image_dir) and its image files, sorted by name."""
    folder = llff_image_dir(base_dir, factor)
    files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f'{folder} holds no images: re-download the scene')
    return folder, files


def _holdout(n, split, llffhold, where):
    """Indices of `split` among n views: every llffhold-th (0, llffhold, ...) is 'test', the rest any other split."""
    indices = np.arange(n)
    test = indices[::llffhold] if llffhold > 0 else np.array([], dtype=int)
    keep = test if split == 'test' else np.setdiff1d(indices, test)
    if len(keep) == 0:
        raise DataError(f'{where}: the {split!r} split is empty with llffhold={llffhold} and {n} images')
    return keep


def load_llff(base_dir, split, factor=4, white_bkgd=False, near=0.0, far=1.0, llffhold=8, **_):
    """LLFF forward-facing scenes: poses_bounds.npy + images_{factor}/, NDC rays."""
    folder, files = _llff_files(base_dir, factor)
    poses, bounds, focal = load_llff_poses(base_dir, factor, len(files), names=files)
    keep = _holdout(len(files), split, llffhold, folder)
    files = [files[i] for i in keep]
    images = _load_images(files, white_bkgd)
    n, h, w = images.shape[:3]
    pix2cam = ray_utils.pinhole_pix2cam(focal, w, h).expand(n, 3, 3).contiguous()
    all_c2w = torch.from_numpy(poses).float()
    return SceneData(
        images,
        pix2cam,
        all_c2w[keep],
        near,
        far,
        ndc=dict(focal=float(focal), w=w, h=h),
        bounds=torch.from_numpy(bounds).float(),
        all_cam2world=all_c2w,
    )


# ----------------------------------------------------------------------------
# mip-NeRF 360 (360_v2): the LLFF layout, unbounded scenes, ordinary pinhole rays.


def load_360(base_dir, split, factor=4, white_bkgd=False, near=0.2, far=1e6, llffhold=8, **_):
    """mip-NeRF 360 scenes: poses_bounds.npy + images_{factor}/ (the LLFF layout), pinhole rays without NDC.

    The cameras are normalized as multinerf's 360 scenes (`pose_utils.transform_poses_pca`: centred at
    their mean, turned into their principal axes with z up, scaled so that every camera centre lies in
    the unit ball); near and far are in those units, not scaled (multinerf's 360.gin). `bounds` are the
    depth bounds of poses_bounds.npy in the same units. Every llffhold-th image is a test image.
    """
    folder, files = _llff_files(base_dir, factor)
    poses, bounds, focal = read_poses_bounds(base_dir, factor, len(files), names=files)
    poses, transform = pose_utils.transform_poses_pca(torch.from_numpy(poses))
    bounds = bounds * float(transform[:3, 0].norm())  # the scale of the similarity
    keep = _holdout(len(files), split, llffhold, folder)
    images = _load_images([files[i] for i in keep], white_bkgd)
    n, h, w = images.shape[:3]
    pix2cam = ray_utils.pinhole_pix2cam(focal, w, h).expand(n, 3, 3).contiguous()
    all_c2w = poses.float()
    return SceneData(
        images, pix2cam, all_c2w[keep], near, far, bounds=torch.from_numpy(bounds).float(), all_cam2world=all_c2w
    )


# ----------------------------------------------------------------------------
# Captures: the instant-ngp / nerfstudio transforms.json (a phone or camera capture posed by COLMAP).

CAPTURE_FIX = (
    'fix transforms.json or re-make it (scripts/process_capture.py; or instant-ngp colmap2nerf.py, '
    'nerfstudio ns-process-data)'
)
CAPTURE_MODELS = ('OPENCV', 'PINHOLE', 'SIMPLE_PINHOLE')  # nerfstudio's camera_model values this loader reads
CAPTURE_DISTORTION = ('k1', 'k2', 'p1', 'p2', 'k3')  # OpenCV's order


def pix2cam_from_intrinsics(fx, fy, cx, cy, dtype=torch.float32, device=None):
    """The `[3, 3]` pix2cam of a pinhole camera of focal lengths (fx, fy) and principal point (cx, cy), in pixels.

    Pixel (x + 0.5, y + 0.5) maps to ((x + 0.5 - cx) / fx, -(y + 0.5 - cy) / fy, -1): (cx, cy) is measured
    from the image's top-left corner, pixel centres at +0.5 (COLMAP's, instant-ngp's and nerfstudio's
    convention), so cx = W/2 is the centre and `ray_utils.pinhole_pix2cam(f, W, H)` is fx = fy = f.
    """
    fx, fy, cx, cy = (float(v) for v in (fx, fy, cx, cy))
    return torch.tensor([[1 / fx, 0, -cx / fx], [0, -1 / fy, cy / fy], [0, 0, -1]], dtype=dtype, device=device)


@functools.lru_cache(maxsize=4)
def _undistort_maps(w, h, fx, fy, cx, cy, dist):
    k = np.array([[fx, 0.0, cx - 0.5], [0.0, fy, cy - 0.5], [0.0, 0.0, 1.0]])
    return cv2.initUndistortRectifyMap(k, np.array(dist, dtype=np.float64), None, k, (w, h), cv2.CV_32FC1)


def undistort_image(img, fx, fy, cx, cy, dist):
    """`img` `[H, W, C]` of an OpenCV-model camera, as the pinhole camera of the same fx, fy, cx, cy and size sees it.

    `dist` is (k1, k2, p1, p2[, k3]). Pixel (x, y) of the result takes the colour at the distorted
    position of its centre (bilinear). Positions past the border take the nearest edge pixel: where
    the lens pushes the image outwards (the fox: up to 10 pixels along the edges, 1.6% of the pixels),
    the pinhole view is wider than the photo. (cx, cy) are in `pix2cam_from_intrinsics`'s convention;
    OpenCV puts pixel centres at integers, so it is given (cx - 0.5, cy - 0.5).
    """
    dist = tuple(float(d) for d in dist)
    if not any(dist):
        return img
    h, w = img.shape[:2]
    mx, my = _undistort_maps(w, h, float(fx), float(fy), float(cx), float(cy), dist)
    return cv2.remap(img, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _capture_number(value, key, where, positive=False):
    """float(value), or a DataError naming the key."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        v = None
    if v is None or not math.isfinite(v) or (positive and v <= 0):
        what = 'a positive number' if positive else 'a finite number'
        raise DataError(f'{where}: {key} is {_short(value)}, not {what}: {CAPTURE_FIX}')
    return v


def capture_camera(meta, frame, size, meta_path, name):
    """(fx, fy, cx, cy, dist) of one frame of a transforms.json, in pixels of its full-size image.

    Each key is the frame's own if it has it (nerfstudio), else the scene's. fl_x may be given as
    camera_angle_x (instant-ngp), fl_y as camera_angle_y or left out (square pixels); cx, cy default to
    the centre; w, h, if given, must be the image's size (`size` (H, W), as read). `name` names the
    frame in messages ('frame 3 (images/0004.jpg)').
    """
    where = f'{meta_path}: {name}'

    def get(key):
        if key in frame:
            return frame[key], where
        return meta.get(key), meta_path

    model, at = get('camera_model')
    fisheye, _ = get('is_fisheye')
    if (model is not None and str(model).upper() not in CAPTURE_MODELS) or fisheye:
        name = 'is_fisheye' if fisheye else f'camera_model {_short(model)}'
        raise DataError(
            f'{at}: {name} is not supported (only {", ".join(CAPTURE_MODELS)}): undistort the images first '
            '(such as with COLMAP image_undistorter) and re-make transforms.json'
        )
    h, w = size
    for key, n in (('w', w), ('h', h)):
        value, at = get(key)
        if value is not None and abs(_capture_number(value, key, at, positive=True) - n) > 0.5:
            raise DataError(
                f'{at}: {key} is {_short(value)}, but the image of {name} is {w}x{h}: '
                'w and h must be the size of the images (or left out)'
            )

    def focal(key, angle_key, length):
        value, at = get(key)
        if value is not None:
            return _capture_number(value, key, at, positive=True)
        angle, at = get(angle_key)
        if angle is None:
            return None
        a = _capture_number(angle, angle_key, at)
        if not 0 < a < math.pi:
            raise DataError(
                f'{at}: {angle_key} is {a:g}, not a field of view in radians between 0 and pi: {CAPTURE_FIX}'
            )
        return 0.5 * length / math.tan(0.5 * a)

    fx = focal('fl_x', 'camera_angle_x', w)
    if fx is None:
        raise DataError(
            f'{meta_path} has neither fl_x nor camera_angle_x (for {name}): '
            f'add the focal length in pixels (fl_x, fl_y), or {CAPTURE_FIX}'
        )
    fy = focal('fl_y', 'camera_angle_y', h) or fx
    centre = []
    for key, default in (('cx', w / 2), ('cy', h / 2)):
        value, at = get(key)
        centre.append(default if value is None else _capture_number(value, key, at))
    cx, cy = centre
    dist = []
    for key in CAPTURE_DISTORTION:
        value, at = get(key)
        dist.append(0.0 if value is None else _capture_number(value, key, at))
    for key in ('k4', 'k5', 'k6'):
        value, at = get(key)
        if value is not None and _capture_number(value, key, at) != 0:
            raise DataError(
                f'{at}: {key} is {_short(value)}, but only the OpenCV model (k1 k2 p1 p2 k3) is supported: '
                'undistort the images first (such as with COLMAP image_undistorter) and re-make transforms.json'
            )
    return fx, fy, cx, cy, tuple(dist)


def read_capture(base_dir):
    """The frames of base_dir/transforms.json, checked and sorted by file_path (multinerf's image order).

    Returns (meta_path, meta, frames), frames a list of dict(index (in the file), file_path, path (the
    image file), c2w (float64 `[3, 4]`, OpenGL axes), frame (its JSON object)).
    """
    meta_path = os.path.join(base_dir, 'transforms.json')
    _check_path(
        meta_path,
        meta_path,
        'a file',
        'make it with instant-ngp colmap2nerf.py or nerfstudio ns-process-data, or check --base_dir',
    )
    meta = _load_json(meta_path)
    frames = meta.get('frames') if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise DataError(f'{meta_path} is malformed: it needs a non-empty list "frames": {CAPTURE_FIX}')
    out = []
    for i, frame in enumerate(frames):
        fp = frame.get('file_path') if isinstance(frame, dict) else None
        if not isinstance(fp, str):
            raise DataError(
                f'{meta_path}: frame {i} has file_path {_short(fp)}, not a string: set it to the image path '
                'relative to the scene (such as "images/0001.jpg")'
            )
        try:
            c2w = np.array(frame['transform_matrix'], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f'{meta_path}: frame {i} ({fp}) has no 4x4 transform_matrix ({type(e).__name__}: {e}): {CAPTURE_FIX}'
            ) from None
        if c2w.shape not in ((4, 4), (3, 4)):
            raise DataError(
                f'{meta_path}: frame {i} ({fp}) has a transform_matrix of shape {c2w.shape}, not 4x4: {CAPTURE_FIX}'
            )
        path = os.path.join(base_dir, fp)
        if not os.path.splitext(fp)[1] and not os.path.exists(path):  # Blender style: no extension
            path = next((path + e for e in IMAGE_EXTENSIONS if os.path.exists(path + e)), path)
        out.append(dict(index=i, file_path=fp, path=path, c2w=c2w[:3, :4], frame=frame))
    out.sort(key=lambda f: f['file_path'])

    def where(k):
        return f'{meta_path}: frame {out[k]["index"]} ({out[k]["file_path"]})'

    _check_poses(np.stack([f['c2w'] for f in out]), 'transform_matrix', where, CAPTURE_FIX)
    for f in out:
        _check_path(
            f['path'],
            f'image {f["path"]} (file_path of frame {f["index"]} in {meta_path})',
            'an image',
            'restore the image or fix its file_path',
        )
    return meta_path, meta, out


def load_capture(base_dir, split, factor=2, white_bkgd=False, near=0.2, far=1e6, llffhold=8, **_):
    """A capture in the instant-ngp / nerfstudio layout: transforms.json + images, pinhole rays without NDC.

    Intrinsics `fl_x fl_y cx cy` (see `capture_camera`) give each view its own pix2cam; images with
    OpenCV distortion (`k1 k2 p1 p2`, `k3`) are undistorted at load time into the pinhole camera of
    the same intrinsics and size (`undistort_image`), then area-downsampled by `factor` (the
    intrinsics divided by it). Views are sorted by file_path; every llffhold-th is a test view. The
    cameras are normalized as the 360 scenes (`pose_utils.transform_poses_pca`).
    """
    meta_path, meta, frames = read_capture(base_dir)
    poses, _ = pose_utils.transform_poses_pca(torch.from_numpy(np.stack([f['c2w'] for f in frames])))
    keep = _holdout(len(frames), split, llffhold, meta_path)
    s = max(factor, 1)

    def one(k):
        f = frames[k]
        img = read_image(f['path'])
        name = f'frame {f["index"]} ({f["file_path"]})'
        fx, fy, cx, cy, dist = capture_camera(meta, f['frame'], img.shape[:2], meta_path, name)
        small = area_downsample(composite(undistort_image(img, fx, fy, cx, cy, dist), white_bkgd), factor)
        return img.shape[:2], img.shape[-1] == 4, (fx / s, fy / s, cx / s, cy / s), small

    read = _read_all(keep, one)
    files = [frames[k]['path'] for k in keep]
    _same_size([r[0] for r in read], files)
    if white_bkgd:
        _note_no_alpha([r[1] for r in read], files)
    images = torch.from_numpy(np.stack([r[3] for r in read]))
    pix2cam = torch.stack([pix2cam_from_intrinsics(*r[2]) for r in read])
    all_c2w = poses.float()
    return SceneData(images, pix2cam, all_c2w[keep], near, far, all_cam2world=all_c2w)


# ----------------------------------------------------------------------------
# Multicam (multiscale Blender, made by scripts/convert_blender_data.py).

MULTICAM_KEYS = ('file_path', 'cam2world', 'pix2cam', 'width', 'height', 'lossmult', 'near', 'far')


def load_multicam(base_dir, split, white_bkgd=True, **_):
    """The multiscale Blender format: metadata.json[split] + images of 4 scales."""
    meta_path = os.path.join(base_dir, 'metadata.json')
    meta = _load_json(meta_path)
    if split not in meta:
        raise DataError(f'{meta_path} has no {split!r} split (it has {sorted(meta)})')
    m = meta[split]
    missing = [k for k in MULTICAM_KEYS if k not in m]
    if missing:
        raise DataError(
            f'{meta_path} is malformed: split {split!r} lacks {missing}; re-run scripts/convert_blender_data.py'
        )
    try:
        n = len(m['file_path'])
        cam2world = torch.tensor(m['cam2world'], dtype=torch.float32)[:, :3, :4]
        pix2cam = torch.tensor(m['pix2cam'], dtype=torch.float32)
        sizes = [(int(hh), int(ww)) for hh, ww in zip(m['height'], m['width'])]
        lossmult, near, far = (torch.tensor(m[k], dtype=torch.float32) for k in ('lossmult', 'near', 'far'))
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        raise DataError(f'{meta_path} is malformed ({e}): re-run scripts/convert_blender_data.py') from None
    if (
        not all(len(v) == n for v in (cam2world, pix2cam, sizes, lossmult, near, far))
        or pix2cam.shape[1:] != (3, 3)
        or cam2world.shape[1:] != (3, 4)
    ):
        raise DataError(f'{meta_path} is malformed: the fields of split {split!r} differ in length or shape')
    paths = m['file_path']
    fix = 're-run scripts/convert_blender_data.py'
    for i, p in enumerate(paths):
        if not isinstance(p, str):
            raise DataError(f'{meta_path}: image {i} of split {split!r} has file_path {_short(p)}, not a string: {fix}')

    def where(i):
        return f'{meta_path}: image {i} ({paths[i]}) of split {split!r}'

    _check_poses(cam2world.numpy(), 'cam2world', where, fix)
    finite = torch.isfinite(pix2cam).flatten(1).all(1)
    if not finite.all():
        raise DataError(f'{where(int(torch.argmin(finite.int())))} has NaN or inf in its pix2cam: {fix}')
    for i, v in enumerate(pix2cam[:, 0, 0].tolist()):
        if v <= 0:
            raise DataError(
                f'{where(i)} has a non-positive focal length: pix2cam[0][0] is {v:g} (the focal length, 1/that, '
                f'must be positive): {fix}'
            )
    files = [os.path.join(base_dir, p) for p in paths]

    def one(path):
        img = read_image(path)
        return img.shape[-1] == 4, torch.from_numpy(composite(img, white_bkgd))

    read = _read_all(files, one)
    images = [im for _, im in read]
    for path, im, size in zip(files, images, sizes):
        if tuple(im.shape[:2]) != size:
            raise DataError(f'image {path} has size {tuple(im.shape[:2])}, but {meta_path} says {size}')
    if white_bkgd:
        _note_no_alpha([alpha for alpha, _ in read], files)
    return SceneData(images, pix2cam, cam2world, near, far, lossmult=lossmult, labels=m.get('label'))


# ----------------------------------------------------------------------------

LOADERS = {
    'blender': load_blender,
    'demo': load_blender,
    'llff': load_llff,
    'multicam': load_multicam,
    '360': load_360,
    'capture': load_capture,
}


def get_dataset(dataset_name, base_dir, split, factor=None, white_bkgd=None, near=None, far=None, llffhold=8):
    """Load one split of a scene; unset options take the dataset's defaults."""
    if dataset_name not in LOADERS:
        raise DataError(f'unknown dataset {dataset_name!r}: use one of {sorted(LOADERS)}')
    if not os.path.isdir(base_dir):
        raise DataError(f'scene folder {base_dir} not found')
    d = DATASETS[dataset_name].defaults

    def pick(v, k):
        return d[k] if v is None else v

    return LOADERS[dataset_name](
        base_dir,
        split,
        factor=pick(factor, 'factor'),
        white_bkgd=pick(white_bkgd, 'white_bkgd'),
        near=pick(near, 'near'),
        far=pick(far, 'far'),
        llffhold=llffhold,
    )


def dataset_from_config(cfg, split):
    return get_dataset(
        cfg.dataset_name, cfg.base_dir, split, cfg.factor, cfg.white_bkgd, cfg.near, cfg.far, cfg.llffhold
    )


class RaySampler:
    """Random training rays, drawn with replacement, as the official `batching`:

    - 'all_images': uniformly from all pixels of all images (LLFF, Multicam);
    - 'single_image': one image drawn uniformly per batch, then pixels
      uniformly from it (Blender). Images of any size: each batch draws from
      the pixels of its own image.

    Pixels and cameras live on `device`; each batch is a few index
    operations and one ray generation, so nothing passes through the host
    per step. The generator's state is saved with checkpoints for exact
    resumes.
    """

    def __init__(self, data, batch_size, device, seed=0, batching='all_images'):
        if batching not in ('all_images', 'single_image'):
            raise ValueError(f'unknown batching {batching!r}: use all_images or single_image')
        self.batch_size, self.batching = batch_size, batching
        self.device = torch.device(device)
        self.pixels = torch.cat([im.reshape(-1, 3) for im in data.images]).to(self.device)
        counts = torch.tensor([h * w for h, w in data.sizes])
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(self.device)
        self.heights = torch.tensor([h for h, _ in data.sizes], device=self.device)
        self.widths = torch.tensor([w for _, w in data.sizes], device=self.device)
        self.num_pixels = int(counts.sum())
        self.counts = counts.to(self.device)
        self.pix2cam = data.pix2cam.to(self.device)
        self.cam2world = data.cam2world.to(self.device)
        self.near, self.far = data.near.to(self.device), data.far.to(self.device)
        self.lossmult = data.lossmult.to(self.device)
        self.ndc = data.ndc
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed)

    def sample(self):
        """Returns (Rays of `[B, C]`, target colours `[B, 3]`), on the device."""
        if self.batching == 'single_image':
            one = torch.randint(len(self.counts), (1,), device=self.device, generator=self.generator)
            img = one.expand(self.batch_size)
            u = torch.rand(self.batch_size, device=self.device, generator=self.generator, dtype=torch.float64)
            count = self.counts[img]
            pix = (u * count).long().minimum(count - 1)
            idx = self.starts[img] + pix
        else:
            idx = torch.randint(self.num_pixels, (self.batch_size,), device=self.device, generator=self.generator)
            img = torch.searchsorted(self.starts, idx, right=True) - 1
            pix = idx - self.starts[img]
        w = self.widths[img]
        y, x = pix // w, pix % w
        rays = make_rays(
            self.pix2cam[img],
            self.cam2world[img],
            x,
            y,
            self.heights[img],
            w,
            self.near[img],
            self.far[img],
            self.lossmult[img],
            self.ndc,
        )
        return rays, self.pixels[idx]

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'].cpu())  # a CPU byte tensor, wherever it was loaded
