"""Scene loaders and the on-device ray sampler used for training.

    data = get_dataset('blender', 'data/nerf_synthetic/lego', 'train', factor=0)
    data.images            # float32 [N, H, W, 3] in [0, 1] (CPU tensor)
    data.h, data.w, data.focal
    data.rays_of_image(0)  # Rays of [H, W, C] tensors
    sampler = RaySampler(data, batch_size=4096, device='cuda', seed=0)
    rays, target = sampler.sample()  # generated on the device, no DataLoader

A camera is stored as a pix2cam `[3, 3]` and a cam2world `[3, 4]` matrix
(see `ray_utils.pixel_rays`), so every loader shares one ray generator.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

import config as config_lib
import ray_utils


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the fix."""


def read_image(path):
    """An image file as float32 `[H, W, C]` in [0, 1] (RGB or RGBA)."""
    if not os.path.isfile(path):
        raise DataError(f'image {path} is missing: re-download or regenerate the scene')
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f'image {path} is unreadable (truncated or not an image): re-download the scene')
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., [2, 1, 0, 3]] if img.shape[-1] == 4 else img[..., [2, 1, 0]]
    scale = 65535. if img.dtype == np.uint16 else 255.
    return img.astype(np.float32) / scale


def area_downsample(img, factor):
    """Average each factor x factor block of pixels: `[H, W, C]` -> `[H//f, W//f, C]`."""
    if factor <= 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def composite(rgba, white_bkgd):
    """RGBA -> RGB over a white (or black) background; RGB passes through."""
    if rgba.shape[-1] == 3:
        return rgba
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return rgb * alpha + (1. - alpha) if white_bkgd else rgb * alpha


class SceneData:
    """Images and cameras of one split of a scene.

    Attributes:
      images: float32 `[N, H, W, 3]` tensor in [0, 1].
      h, w, focal: image size and focal length in pixels.
      pix2cam `[N, 3, 3]`, cam2world `[N, 3, 4]`: float32 cameras.
      near, far, lossmult: float32 `[N]` per-image ray attributes.
    """

    def __init__(self, images, focal, pix2cam, cam2world, near, far, lossmult=None):
        self.images = images
        self.h, self.w = images.shape[1:3]
        self.focal = float(focal)
        self.pix2cam = pix2cam
        self.cam2world = cam2world
        n = images.shape[0]
        self.near = torch.full((n,), float(near)) if np.isscalar(near) else near
        self.far = torch.full((n,), float(far)) if np.isscalar(far) else far
        self.lossmult = torch.ones(n) if lossmult is None else lossmult

    def __len__(self):
        return self.images.shape[0]

    def rays_of_image(self, i):
        """Rays of every pixel of image i: `Rays` of `[H, W, C]` tensors."""
        y, x = torch.meshgrid(torch.arange(self.h), torch.arange(self.w), indexing='ij')
        return make_rays(self.pix2cam[i], self.cam2world[i], x, y,
                         self.near[i], self.far[i], self.lossmult[i])


def make_rays(pix2cam, cam2world, x, y, near, far, lossmult):
    """Rays of pixels (x, y) of cameras; per-camera tensors broadcast to `[...]`."""
    origins, directions, viewdirs, radii = ray_utils.pixel_rays(pix2cam, cam2world, x, y)
    ones = torch.ones_like(radii)
    as_col = lambda v: torch.as_tensor(v, dtype=radii.dtype, device=radii.device)[..., None] * ones
    return ray_utils.Rays(origins, directions, viewdirs, radii, as_col(lossmult), as_col(near), as_col(far))


def _load_json(path):
    if not os.path.isfile(path):
        raise DataError(f'{path} is missing: re-download the scene')
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f'{path} is not valid JSON ({e}): re-download the scene') from None


def _read_all(paths, fn):
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, paths))


def load_blender(base_dir, split, factor=0, white_bkgd=True, near=2., far=6.):
    """The NeRF synthetic (Blender) format: transforms_{split}.json + RGBA PNGs."""
    meta_path = os.path.join(base_dir, f'transforms_{split}.json')
    meta = _load_json(meta_path)
    try:
        camera_angle_x = float(meta['camera_angle_x'])
        frames = meta['frames']
        files = [os.path.join(base_dir, f['file_path'] + ('' if f['file_path'].endswith('.png') else '.png'))
                 for f in frames]
        cams = np.array([f['transform_matrix'] for f in frames], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f'{meta_path} is malformed ({type(e).__name__}: {e}): '
                        'it needs camera_angle_x and frames with file_path and a 4x4 transform_matrix') from None
    if len(files) == 0 or cams.shape[1:] != (4, 4):
        raise DataError(f'{meta_path} is malformed: it needs at least one frame with a 4x4 transform_matrix')

    def load(path):
        return area_downsample(composite(read_image(path), white_bkgd), factor)
    images = _read_all(files, load)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        first = images[0].shape
        bad = next(p for p, im in zip(files, images) if im.shape != first)
        raise DataError(f'image {bad} has size {images[files.index(bad)].shape[:2]}, '
                        f'but {files[0]} has {first[:2]}: all images of a split must match')
    images = torch.from_numpy(np.stack(images))
    n, h, w = images.shape[:3]
    focal = 0.5 * w / np.tan(0.5 * camera_angle_x)
    pix2cam = ray_utils.pinhole_pix2cam(focal, w, h).expand(n, 3, 3).contiguous()
    return SceneData(images, focal, pix2cam, torch.from_numpy(cams[:, :3, :4]), near, far)


LOADERS = {'blender': load_blender, 'demo': load_blender}


def get_dataset(dataset_name, base_dir, split, factor=0, white_bkgd=None, near=None, far=None):
    """Load one split of a scene; unset options take the dataset's defaults."""
    if dataset_name not in LOADERS:
        raise DataError(f'unknown dataset {dataset_name!r}: use one of {sorted(LOADERS)}')
    if not os.path.isdir(base_dir):
        raise DataError(f'scene folder {base_dir} not found')
    d = config_lib.DATASET_DEFAULTS[dataset_name]
    return LOADERS[dataset_name](
        base_dir, split, factor=factor,
        white_bkgd=d['white_bkgd'] if white_bkgd is None else white_bkgd,
        near=d['near'] if near is None else near, far=d['far'] if far is None else far)


def dataset_from_config(cfg, split):
    return get_dataset(cfg.dataset_name, cfg.base_dir, split, cfg.factor, cfg.white_bkgd, cfg.near, cfg.far)


class RaySampler:
    """Random training rays, drawn uniformly from all pixels of all images.

    Pixels and cameras live on `device`; each batch is a few index
    operations and one call of `ray_utils.pixel_rays`, so nothing passes
    through the host per step. The generator's state is saved with
    checkpoints for exact resumes.
    """

    def __init__(self, data, batch_size, device, seed=0):
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.pixels = data.images.reshape(-1, 3).to(self.device)
        n, h, w = data.images.shape[:3]
        self.num_pixels = n * h * w
        self.h, self.w = h, w
        self.pix2cam = data.pix2cam.to(self.device)
        self.cam2world = data.cam2world.to(self.device)
        self.near, self.far = data.near.to(self.device), data.far.to(self.device)
        self.lossmult = data.lossmult.to(self.device)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed)

    def sample(self):
        """Returns (Rays of `[B, C]`, target colours `[B, 3]`), on the device."""
        idx = torch.randint(self.num_pixels, (self.batch_size,), device=self.device, generator=self.generator)
        img, pix = idx // (self.h * self.w), idx % (self.h * self.w)
        y, x = pix // self.w, pix % self.w
        rays = make_rays(self.pix2cam[img], self.cam2world[img], x, y,
                         self.near[img], self.far[img], self.lossmult[img])
        return rays, self.pixels[idx]

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])
