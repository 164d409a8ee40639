import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import datasets
from conftest import LEGO, needs_lego


@needs_lego
def test_lego_rays_equal_a_hand_computed_pinhole_camera():
    data = datasets.get_dataset('blender', LEGO, 'val', factor=0)
    meta = json.load(open(os.path.join(LEGO, 'transforms_val.json')))
    assert len(data) == len(meta['frames']) == 9
    assert data.images.shape == (9, 800, 800, 3) and data.images.dtype == torch.float32
    assert 0 <= data.images.min() and data.images.max() <= 1
    focal = 400 / math.tan(0.5 * meta['camera_angle_x'])
    assert data.focal == pytest.approx(focal) and abs(focal - 1111.11) < 0.01
    assert torch.all(data.images[:, 0, 0] == 1)  # background composited on white
    for i in (0, 4):
        c2w = np.array(meta['frames'][i]['transform_matrix'], dtype=np.float64)
        rays = data.rays_of_image(i)
        for x, y in [(0, 0), (799, 0), (400, 400), (123, 701)]:
            cam = np.array([(x + 0.5 - 400) / focal, -(y + 0.5 - 400) / focal, -1.0])
            d = c2w[:3, :3] @ cam
            np.testing.assert_allclose(rays.origins[y, x].numpy(), c2w[:3, 3], rtol=0, atol=1e-6)
            np.testing.assert_allclose(rays.directions[y, x].numpy(), d, rtol=0, atol=1e-6)
            np.testing.assert_allclose(rays.viewdirs[y, x].numpy(), d / np.linalg.norm(d), rtol=0, atol=1e-6)
        # Radius: neighbouring rows' directions differ by 1/f; times 2/sqrt(12).
        np.testing.assert_allclose(rays.radii.numpy(), 2 / math.sqrt(12) / focal, rtol=1e-4)
        assert torch.all(rays.near == 2) and torch.all(rays.far == 6) and torch.all(rays.lossmult == 1)


@needs_lego
def test_lego_factor_is_an_area_average_of_the_composited_image():
    full = datasets.get_dataset('blender', LEGO, 'val', factor=0)
    half = datasets.get_dataset('blender', LEGO, 'val', factor=2)
    assert half.images.shape == (9, 400, 400, 3)
    assert half.focal == pytest.approx(full.focal / 2)
    blocks = full.images[0].reshape(400, 2, 400, 2, 3).mean(dim=(1, 3))
    torch.testing.assert_close(half.images[0], blocks, atol=1e-5, rtol=0)
    # Ray through the centre of half-res pixel (x, y) = ray through the corner shared by 4 full-res pixels.
    r_half, r_full = half.rays_of_image(0), full.rays_of_image(0)
    d_half = r_half.viewdirs[100, 200]
    d_full = 0.5 * (r_full.directions[200, 400] + r_full.directions[201, 401])
    torch.testing.assert_close(d_half, d_full / d_full.norm(), atol=1e-6, rtol=0)
    torch.testing.assert_close(r_half.radii[0, 0], 2 * r_full.radii[0, 0])


def test_demo_scene_loads(tiny_demo):
    data = datasets.get_dataset('demo', tiny_demo, 'train')
    assert data.images.shape == (20, 32, 32, 3)
    assert data.images.min() >= 0 and data.images.max() <= 1
    # Corners are background (white); the centre sees the object.
    assert torch.all(data.images[:, 0, 0] == 1)
    assert torch.all(data.images[:, 16, 16].sum(-1) < 2.9)
    black = datasets.get_dataset('demo', tiny_demo, 'test', white_bkgd=False)
    assert torch.all(black.images[:, 0, 0] == 0)


def test_ray_sampler_draws_the_rays_and_pixels_of_the_images(tiny_demo, device):
    data = datasets.get_dataset('demo', tiny_demo, 'train')
    sampler = datasets.RaySampler(data, 500, device, seed=3)
    rays, target = sampler.sample()
    assert rays.origins.shape == (500, 3) and target.shape == (500, 3)
    assert rays.origins.device.type == device.type and target.device.type == device.type
    # Find each sampled pixel by its colour and direction in the full ray set.
    all_rays = [data.rays_of_image(i) for i in range(len(data))]
    dirs = torch.stack([r.viewdirs for r in all_rays]).reshape(-1, 3)
    pix = data.images.reshape(-1, 3)
    for k in range(0, 500, 25):
        j = torch.argmin((dirs - rays.viewdirs[k].cpu()).norm(dim=-1) + (pix - target[k].cpu()).abs().sum(-1))
        torch.testing.assert_close(dirs[j], rays.viewdirs[k].cpu(), atol=1e-5, rtol=0)
        torch.testing.assert_close(pix[j], target[k].cpu())
    # Same seed, same batch; state round-trips.
    again = datasets.RaySampler(data, 500, device, seed=3)
    torch.testing.assert_close(again.sample()[1], target)
    state = sampler.state_dict()
    b1 = sampler.sample()[1]
    sampler.load_state_dict(state)
    torch.testing.assert_close(sampler.sample()[1], b1)


def test_single_image_batching_draws_each_batch_from_one_uniform_image(tiny_demo):
    """The official Blender batching: one image per batch, uniformly; pixels uniform within it."""
    data = datasets.get_dataset('demo', tiny_demo, 'train')
    n, h, w = len(data), data.h, data.w
    sampler = datasets.RaySampler(data, 400, 'cpu', seed=5, batching='single_image')
    pix = data.images.reshape(n, -1, 3)
    origins = torch.stack([data.rays_of_image(i).origins[0, 0] for i in range(n)])
    image_counts = torch.zeros(n)
    pixel_counts = torch.zeros(h * w)
    for _ in range(400):
        rays, target = sampler.sample()
        # One camera per batch: every ray starts at the same camera centre.
        img = int(torch.argmin((origins - rays.origins[0]).norm(dim=-1)))
        torch.testing.assert_close(rays.origins, origins[img].expand(400, 3))
        image_counts[img] += 1
        # Each target is a pixel of that image, at the pixel its direction points through.
        dirs = data.rays_of_image(img).viewdirs.reshape(-1, 3)
        j = torch.cdist(rays.viewdirs, dirs).argmin(dim=-1)
        torch.testing.assert_close(target, pix[img, j])
        pixel_counts += torch.bincount(j, minlength=h * w)
    # 400 batches over 20 images: 20 per image expected; a chi-square far below its 0.1% tail (43.8, 19 dof).
    expected = 400 / n
    assert float(((image_counts - expected) ** 2 / expected).sum()) < 43.8
    # 160,000 pixels over 1,024 positions: 156 expected each; the chi-square (1023 dof) near its mean.
    e = pixel_counts.sum() / (h * w)
    assert float(((pixel_counts - e) ** 2 / e).sum()) < 1023 + 5 * (2 * 1023) ** 0.5
    with pytest.raises(ValueError, match='unknown batching'):
        datasets.RaySampler(data, 4, 'cpu', batching='one_image')


def test_single_image_batching_with_images_of_different_sizes():
    """Multicam-like data: a batch stays inside its own image, whatever its size."""

    class Data:  # two images, 2x3 and 4x5, with distinct colours per pixel
        sizes = [(2, 3), (4, 5)]
        images = [torch.arange(18.0).reshape(2, 3, 3) / 100, 0.5 + torch.arange(60.0).reshape(4, 5, 3) / 200]
        pix2cam = torch.eye(3).expand(2, 3, 3)
        cam2world = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).expand(2, 3, 4)
        near, far, lossmult = torch.full((2,), 2.0), torch.full((2,), 6.0), torch.tensor([1.0, 4.0])
        ndc = None

    sampler = datasets.RaySampler(Data(), 300, 'cpu', seed=0, batching='single_image')
    seen = set()
    for _ in range(30):
        rays, target = sampler.sample()
        first = bool(target[0, 0] < 0.5)
        assert torch.all((target[:, 0] < 0.5) == first)  # all from one image
        assert torch.all(rays.lossmult == (1.0 if first else 4.0))
        seen.add((first, len(torch.unique(target[:, 0]))))
    assert seen == {(True, 6), (False, 20)}  # every pixel of each, none beyond


def test_blender_loader_names_bad_files(tmp_path, tiny_demo):
    scene = tmp_path / 'scene'
    shutil.copytree(tiny_demo, scene)
    (scene / 'transforms_val.json').write_text('{"camera_angle_x": 0.7, "frames": [')
    with pytest.raises(datasets.DataError, match='transforms_val.json is not valid JSON'):
        datasets.get_dataset('blender', str(scene), 'val')
    os.remove(scene / 'test' / 'r_1.png')
    with pytest.raises(datasets.DataError, match=r'r_1.png is missing'):
        datasets.get_dataset('blender', str(scene), 'test')
    (scene / 'train' / 'r_2.png').write_bytes(b'\x89PNG truncated')
    with pytest.raises(datasets.DataError, match=r'r_2.png is unreadable'):
        datasets.get_dataset('blender', str(scene), 'train')
