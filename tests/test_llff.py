"""LLFF loader on the real fern scene."""

import math
import os
import shutil

import numpy as np
import pytest
import torch

import datasets
import pose_utils
from conftest import FERN, needs_fern


@needs_fern
@pytest.mark.parametrize('factor', [4, 8])
def test_fern_splits_focal_and_ndc(factor):
    train = datasets.get_dataset('llff', FERN, 'train', factor=factor)
    test = datasets.get_dataset('llff', FERN, 'test', factor=factor)
    assert (len(train), len(test)) == (17, 3)  # every 8th of 20 held out: 0, 8, 16
    assert train.images.shape[1:] == (3024 // factor, 4032 // factor, 3)
    full_focal = np.load(os.path.join(FERN, 'poses_bounds.npy'))[0, 14]
    assert train.focal == pytest.approx(full_focal / factor, rel=1e-6)
    all_c2w = train.all_cam2world
    torch.testing.assert_close(test.cam2world, all_c2w[[0, 8, 16]])
    rays = test.rays_of_image(1)
    torch.testing.assert_close(rays.origins[..., 2], torch.full(rays.origins.shape[:2], -1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        (rays.origins + rays.directions)[..., 2], torch.ones(rays.origins.shape[:2]), atol=1e-5, rtol=0
    )
    assert torch.all(rays.near == 0) and torch.all(rays.far == 1)
    # Poses are centred: their average pose is the identity.
    avg = pose_utils.poses_avg(all_c2w.double())
    torch.testing.assert_close(avg, torch.eye(4, dtype=torch.float64)[:3], atol=1e-5, rtol=0)
    # Scaled so that the nearest bound is 1 / 0.75.
    assert train.bounds.min().item() == pytest.approx(1 / 0.75, rel=1e-5)


@needs_fern
def test_fern_radii_are_ndc_neighbour_distances():
    data = datasets.get_dataset('llff', FERN, 'test', factor=8)
    rays = data.rays_of_image(0)
    o = rays.origins.double().numpy()
    dx = np.linalg.norm(o[1:] - o[:-1], axis=-1)
    dx = np.concatenate([dx, dx[-1:]], 0)
    dy = np.linalg.norm(o[:, 1:] - o[:, :-1], axis=-1)
    dy = np.concatenate([dy, dy[:, -1:]], 1)
    expected = 0.5 * (dx + dy) * 2 / math.sqrt(12)
    np.testing.assert_allclose(rays.radii[..., 0].numpy(), expected, rtol=1e-3)
    # View directions are the world-space directions (official release).
    c2w = data.cam2world[0].double()
    cam = torch.tensor(
        [(5 + 0.5 - data.w / 2) / data.focal, -(7 + 0.5 - data.h / 2) / data.focal, -1.0], dtype=torch.float64
    )
    torch.testing.assert_close(rays.viewdirs[7, 5].double(), c2w[:, :3] @ cam, atol=1e-5, rtol=0)


@needs_fern
def test_fern_sampler_matches_image_rays():
    data = datasets.get_dataset('llff', FERN, 'train', factor=8)
    sampler = datasets.RaySampler(data, 64, 'cpu', seed=1)
    rays, target = sampler.sample()
    idx = torch.randint(sampler.num_pixels, (64,), generator=torch.Generator().manual_seed(1))  # the same draw
    hw = data.h * data.w
    for k in range(0, 64, 8):
        i, p = int(idx[k]) // hw, int(idx[k]) % hw
        full = data.rays_of_image(i)
        for a, b in zip(rays, full):
            torch.testing.assert_close(a[k], b.reshape(-1, b.shape[-1])[p], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(target[k], data.images[i].reshape(-1, 3)[p])


@needs_fern
def test_missing_image_folder_is_made_from_full_resolution_and_cached(tmp_path):
    scene = tmp_path / 'fern'
    scene.mkdir()
    src = sorted(os.listdir(os.path.join(FERN, 'images_8')))[:3]
    (scene / 'images').mkdir()
    for f in src:  # pretend images_8 is the full resolution
        shutil.copy(os.path.join(FERN, 'images_8', f), scene / 'images' / f)
    np.save(scene / 'poses_bounds.npy', np.load(os.path.join(FERN, 'poses_bounds.npy'))[:3])
    (scene / 'images_2.partial').mkdir()  # left by a process killed while making it
    (scene / 'images_2.partial' / 'half.png').write_bytes(b'half')
    data = datasets.get_dataset('llff', str(scene), 'train', factor=2, llffhold=0)
    assert (scene / 'images_2').is_dir() and not (scene / 'images_2.partial').exists()
    assert len(os.listdir(scene / 'images_2')) == 3
    full = datasets.read_image(str(scene / 'images' / src[0]))
    blocks = full[: 378 // 2 * 2, : 504 // 2 * 2].reshape(189, 2, 252, 2, 3).mean(axis=(1, 3))
    assert data.images.shape == (3, 189, 252, 3)
    np.testing.assert_allclose(data.images[0].numpy(), blocks, atol=1 / 255 + 1e-6)
    mtime = os.path.getmtime(scene / 'images_2')
    datasets.get_dataset('llff', str(scene), 'train', factor=2, llffhold=0)
    assert os.path.getmtime(scene / 'images_2') == mtime  # cached


@needs_fern
def test_bad_poses_bounds_are_named(tmp_path):
    scene = tmp_path / 'fern'
    shutil.copytree(os.path.join(FERN, 'images_8'), scene / 'images_8')
    np.save(scene / 'poses_bounds.npy', np.zeros((20, 15)))
    with pytest.raises(datasets.DataError, match=r'poses_bounds.npy has shape \(20, 15\), expected \[N, 17\]'):
        datasets.get_dataset('llff', str(scene), 'train', factor=8)
    np.save(scene / 'poses_bounds.npy', np.load(os.path.join(FERN, 'poses_bounds.npy'))[:5])
    with pytest.raises(datasets.DataError, match='has 5 poses but there are 20 images'):
        datasets.get_dataset('llff', str(scene), 'train', factor=8)
