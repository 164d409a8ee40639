"""Multiscale Blender: the converter and the loader, on real lego frames."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets
from conftest import REPO


def test_converter_layout_sizes_and_lossmult(lego_multicam):
    meta = json.load(open(os.path.join(lego_multicam, 'metadata.json')))
    assert sorted(meta) == ['test', 'train']  # the subset has no val split: skipped
    m = meta['train']
    assert len(m['file_path']) == 3 * 4
    assert m['width'][:4] == [800, 400, 200, 100] and m['height'][:4] == [800, 400, 200, 100]
    assert m['lossmult'][:4] == [1.0, 4.0, 16.0, 64.0] and m['label'][:4] == [0, 1, 2, 3]
    assert set(m['near']) == {2.0} and set(m['far']) == {6.0}
    assert m['file_path'][:2] == ['images_train/000_d0.png', 'images_train/000_d1.png']
    f0 = 400 / np.tan(0.5 * 0.6911112070083618)
    np.testing.assert_allclose(m['pix2cam'][1], [[2 / f0, 0, -200 * 2 / f0], [0, -2 / f0, 200 * 2 / f0], [0, 0, -1]])
    # Each level is the 2x2 mean of the one above (rounded to 8 bits).
    d0 = datasets.read_image(os.path.join(lego_multicam, m['file_path'][0]))
    d1 = datasets.read_image(os.path.join(lego_multicam, m['file_path'][1]))
    assert d0.shape == (800, 800, 4) and d1.shape == (400, 400, 4)
    np.testing.assert_allclose(d1, d0.reshape(400, 2, 400, 2, 4).mean(axis=(1, 3)), atol=1 / 255)


def test_converter_skips_existing_scenes_and_reports_missing_input(lego_multicam, tmp_path):
    script = os.path.join(REPO, 'scripts', 'convert_blender_data.py')
    parent, scene = os.path.split(lego_multicam)
    res = subprocess.run(
        [sys.executable, script, '--blenderdir', parent, '--outdir', parent, '--scene', scene],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and 'exists: skipped' in res.stdout
    res = subprocess.run(
        [sys.executable, script, '--blenderdir', str(tmp_path / 'nope'), '--outdir', str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and 'download_blender.sh' in res.stderr and 'Traceback' not in res.stderr


def test_loader_sizes_lossmult_and_radii_per_scale(lego_multicam):
    data = datasets.get_dataset('multicam', lego_multicam, 'train')
    assert len(data) == 12 and isinstance(data.images, list)
    assert data.sizes[:4] == [(800, 800), (400, 400), (200, 200), (100, 100)]
    torch.testing.assert_close(data.lossmult[:4], torch.tensor([1.0, 4.0, 16.0, 64.0]))
    assert data.labels.tolist()[:4] == [0, 1, 2, 3]
    assert torch.all(data.images[0][0, 0] == 1)  # white background
    r0 = data.rays_of_image(0)
    for k in range(1, 4):
        rk = data.rays_of_image(k)
        # Pixel (0, 0) of level k covers pixels [0, 2^k) of level 0: same centre ray, 2^k times the radius.
        centre = 2**k // 2
        d0 = 0.5 * (r0.viewdirs[centre - 1, centre - 1] + r0.viewdirs[centre, centre])
        torch.testing.assert_close(rk.viewdirs[0, 0], d0 / d0.norm(), atol=1e-6, rtol=0)
        torch.testing.assert_close(rk.radii, torch.full_like(rk.radii, 2**k * r0.radii[0, 0, 0].item()))
        assert torch.all(rk.lossmult == 4**k)


def test_sampler_carries_lossmult_of_the_scale(lego_multicam):
    data = datasets.get_dataset('multicam', lego_multicam, 'train')
    sampler = datasets.RaySampler(data, 20000, 'cpu', seed=0)
    rays, target = sampler.sample()
    mult = rays.lossmult[:, 0]
    assert set(mult.unique().tolist()) <= {1.0, 4.0, 16.0, 64.0}
    # Pixels are drawn uniformly, so level k holds about 4^-k of them.
    frac = torch.stack([(mult == 4.0**k).float().mean() for k in range(4)])
    expected = torch.tensor([4.0**-k for k in range(4)]) / sum(4.0**-k for k in range(4))
    torch.testing.assert_close(frac, expected, atol=0.01, rtol=0)
    # Radii scale with the level too.
    r = rays.radii[:, 0]
    r0 = r[mult == 1].mean()
    for k in range(1, 4):
        torch.testing.assert_close(
            r[mult == 4.0**k], torch.full_like(r[mult == 4.0**k], 2**k * r0.item()), rtol=1e-4, atol=0
        )


def test_malformed_metadata_is_named(lego_multicam, tmp_path):
    scene = tmp_path / 'scene'
    scene.mkdir()
    (scene / 'metadata.json').write_text(json.dumps({'train': {'file_path': ['a.png']}}))
    with pytest.raises(datasets.DataError, match=r"metadata.json is malformed: split 'train' lacks"):
        datasets.get_dataset('multicam', str(scene), 'train')
    with pytest.raises(datasets.DataError, match=r"has no 'test' split"):
        datasets.get_dataset('multicam', str(scene), 'test')
