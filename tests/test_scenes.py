"""The generated unbounded scene (scenes.py): its mip-NeRF 360 / LLFF layout, its cameras read back
through the LLFF loader, its pixels against the exact ray cast, the sky, the far ground, the bounds."""

import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets
import pose_utils
import ray_utils
import scenes
from conftest import REPO

SIZE, VIEWS, SUPERSAMPLE = 32, 12, 2


@pytest.fixture(scope='module')
def unbounded(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('unbounded') / 'scene')
    c2w = scenes.make_unbounded_scene(path, size=SIZE, n_views=VIEWS, supersample=SUPERSAMPLE, verbose=False)
    return path, c2w


def raw_rows(path):
    return np.load(os.path.join(path, 'poses_bounds.npy'))


def opengl_poses(rows):
    """The raw rows' poses in OpenGL axes, converted as datasets.load_llff_poses does (no scaling)."""
    p = rows[:, :15].reshape(-1, 3, 5)
    return np.concatenate([p[:, :, 1:2], -p[:, :, 0:1], p[:, :, 2:4]], -1)


def test_the_layout_is_mip_nerf_360s(unbounded):
    path, _ = unbounded
    assert sorted(os.listdir(path)) == ['images', 'images_2', 'images_4', 'poses_bounds.npy']
    names = [f'img_{i:03d}.png' for i in range(VIEWS)]
    full = [datasets.read_image(os.path.join(path, 'images', n)) for n in names]
    assert all(img.shape == (SIZE, SIZE, 3) for img in full)
    for f in (2, 4):
        assert sorted(os.listdir(os.path.join(path, f'images_{f}'))) == names
        for name, img in zip(names, full):
            small = datasets.read_image(os.path.join(path, f'images_{f}', name))
            assert small.shape == (SIZE // f, SIZE // f, 3)
            # The area average of the rendered image (before rounding), so within a level of the PNG's.
            assert np.abs(small - datasets.area_downsample(img, f)).max() <= 1.01 / 255
    assert raw_rows(path).shape == (VIEWS, 17)
    data = datasets.load_llff(path, 'train', factor=2)  # the loader takes it (llffhold 8: 10 train views)
    assert data.images.shape == (VIEWS - 2, SIZE // 2, SIZE // 2, 3)


def test_the_360_loader_reads_it(unbounded):
    """A smoke test of the scene through the mip-NeRF 360 loader, where the project has one."""
    if '360' not in datasets.DATASETS:
        pytest.skip('datasets has no 360 loader')
    path, _ = unbounded
    for split, n in (('train', VIEWS - 2), ('test', 2)):  # llffhold 8: views 0 and 8 are held out
        data = datasets.get_dataset('360', path, split, factor=4)
        assert data.images.shape == (n, SIZE // 4, SIZE // 4, 3) and data.cam2world.shape == (n, 3, 4)


def test_raw_poses_are_the_cameras_in_llff_axes(unbounded):
    path, c2w = unbounded
    rows = raw_rows(path)
    p = rows[:, :15].reshape(-1, 3, 5)
    np.testing.assert_array_equal(p[:, :, 4], np.tile([SIZE, SIZE, scenes.UNB_FOCAL * SIZE], (VIEWS, 1)))
    # [down, right, back, centre]
    np.testing.assert_allclose(p[:, :, 0], -c2w[:, :, 1], atol=1e-12)
    np.testing.assert_allclose(p[:, :, 1], c2w[:, :, 0], atol=1e-12)
    np.testing.assert_allclose(p[:, :, 2:4], c2w[:, :, 2:4], atol=1e-12)
    assert np.all(np.linalg.det(p[:, :, :3]) > 0.999)
    np.testing.assert_allclose(opengl_poses(rows), c2w, atol=1e-12)
    # The cameras themselves: all around the object, looking at its centre (the origin), upright.
    centre = c2w[:, :, 3]
    dist = np.linalg.norm(centre, axis=1)
    assert np.all((dist >= 3) & (dist <= 5))
    elevation = np.degrees(np.arcsin(centre[:, 2] / dist))
    assert np.all((elevation >= 5) & (elevation <= 30))
    azimuth = np.sort(np.degrees(np.arctan2(centre[:, 1], centre[:, 0])) % 360)
    assert np.diff(np.r_[azimuth, azimuth[0] + 360]).max() < 2 * 360 / VIEWS
    np.testing.assert_allclose(c2w[:, :, 2], centre / dist[:, None], atol=1e-12)  # back = away from the target
    np.testing.assert_allclose(c2w[:, 2, 0], 0, atol=1e-12)  # right is horizontal: no roll


def test_geometry_survives_the_loaders_similarity(unbounded):
    """load_llff_poses scales by 1 / (0.75 min near) and re-centres on the average pose: a similarity.
    Its invariants: the optical axes still meet in one point (the object's centre), distances scale by
    one factor, the right axes still span a plane (normal: the world's up), elevations are kept."""
    path, c2w = unbounded
    rows = raw_rows(path)
    poses, bounds, focal = datasets.load_llff_poses(path, factor=0)
    assert focal == scenes.UNB_FOCAL * SIZE and datasets.load_llff_poses(path, factor=2)[2] == focal / 2
    scale = 1 / (0.75 * rows[:, 15].min())
    np.testing.assert_allclose(bounds, rows[:, 15:] * scale, rtol=1e-12)
    np.testing.assert_allclose(
        poses[:, :, :3].transpose(0, 2, 1) @ poses[:, :, :3], np.tile(np.eye(3), (VIEWS, 1, 1)), atol=1e-9
    )
    # The point nearest every optical axis (least squares): on all of them.
    eye, view = poses[:, :, 3], -poses[:, :, 2]
    proj = np.eye(3) - view[:, :, None] * view[:, None, :]
    target = np.linalg.solve(proj.sum(0), np.einsum('nij,nj->i', proj, eye))
    miss = np.linalg.norm(np.einsum('nij,nj->ni', proj, target - eye), axis=1)
    assert miss.max() < 1e-9
    # ... in front of each camera, at its generated distance times the scale.
    along = np.einsum('ni,ni->n', target - eye, view)
    np.testing.assert_allclose(along, scale * np.linalg.norm(c2w[:, :, 3], axis=1), rtol=1e-9)
    # The known similarity maps the origin there: the inverse of the scaled cameras' average pose.
    scaled = opengl_poses(rows)
    scaled[:, :, 3] *= scale
    avg = pose_utils.to_homogeneous(pose_utils.poses_avg(torch.from_numpy(scaled))).numpy()
    np.testing.assert_allclose(np.linalg.inv(avg)[:3, 3], target, atol=1e-9)
    # Up: normal to every right axis; elevations as generated.
    up = np.linalg.svd(poses[:, :, 0])[2][-1]
    assert np.abs(poses[:, :, 0] @ up).max() < 1e-9
    up *= np.sign(up @ poses[:, :, 1].sum(0))
    generated = np.arcsin(c2w[:, 2, 3] / np.linalg.norm(c2w[:, :, 3], axis=1))
    np.testing.assert_allclose(np.arcsin((eye - target) @ up / np.abs(along)), generated, atol=1e-9)


def centre_rays(rows, i):
    """Origins and unit directions `[H, W, 3]` through the pixel centres of image i, as the loaders cast them."""
    h, w, f = rows[i, 4:15:5]
    pix2cam = ray_utils.pinhole_pix2cam(f, int(w), int(h), dtype=torch.float64)
    y, x = torch.meshgrid(torch.arange(int(h)), torch.arange(int(w)), indexing='ij')
    o, _, d, _ = ray_utils.pixel_rays(pix2cam, torch.from_numpy(opengl_poses(rows)[i]), x, y)
    return o.numpy(), d.numpy()


def flat_pixels(o, d):
    """The centre colours `[H, W, 3]`, kinds `[H, W]` and a mask `[H, W]` of the pixels well inside a flat
    region: the centre rays of the pixel and of its 8 neighbours see one colour (so the pixel lies in it),
    on the ground or the pedestal (the ball and the sky are shaded). Ground pixels also keep to one square:
    far away, where a pixel covers many, point samples that happen to agree make no flat region."""
    colour, t, kind = scenes.unbounded_shade(o, d)
    square = np.floor((o + np.where(np.isfinite(t), t, 0)[..., None] * d)[..., :2] / scenes.GROUND_CELL)
    key = np.concatenate([colour, np.where((kind == scenes.KIND_GROUND)[..., None], square, -1)], -1)
    window = np.lib.stride_tricks.sliding_window_view(key, (3, 3), axis=(0, 1))  # [H-2, W-2, 5, 3, 3]
    flat = np.zeros(kind.shape, bool)
    flat[1:-1, 1:-1] = np.all(window == key[1:-1, 1:-1, :, None, None], axis=(2, 3, 4))
    return colour, kind, flat & np.isin(kind, [scenes.KIND_GROUND, scenes.KIND_BOX])


def test_pixels_are_the_ray_cast(unbounded):
    """Each written image is the render (to 8 bits); a pixel well inside a flat region equals the colour
    cast through its centre (one ray, point sampled), in the written images and in a close-up."""
    path, c2w = unbounded
    rows = raw_rows(path)
    checked = np.zeros(4, int)  # pixels per KIND_*
    for i in range(VIEWS):
        img = datasets.read_image(os.path.join(path, 'images', f'img_{i:03d}.png'))
        rgb, _, _ = scenes.render_unbounded(c2w[i], SIZE, supersample=SUPERSAMPLE)
        assert np.abs(img - rgb).max() <= 0.5 / 255 + 1e-6
        colour, kind, flat = flat_pixels(*centre_rays(rows, i))
        assert np.all(np.abs(img[flat] - colour[flat]) <= 0.5 / 255 + 1e-6)
        checked += np.bincount(kind[flat], minlength=4)
    assert checked[scenes.KIND_GROUND] > 100
    # A close-up of the pedestal (its squares are 2-3 pixels wide in the small images above).
    size = 32
    rows = datasets.to_poses_bounds(
        pose_utils.spherical_pose(20.0, 25.0, 1.6, dtype=torch.float64)[None].numpy(), size, size, 40.0, [[1, 2]]
    )
    rgb, _, _ = scenes.render_unbounded(opengl_poses(rows)[0], size, 40.0, supersample=4)
    colour, kind, flat = flat_pixels(*centre_rays(rows, 0))
    assert np.abs(rgb[flat] - colour[flat]).max() < 1e-6
    assert (
        np.count_nonzero(kind[flat] == scenes.KIND_BOX) > 40 and np.count_nonzero(kind[flat] == scenes.KIND_GROUND) > 10
    )


def test_the_sky_depends_only_on_the_direction(unbounded):
    path, c2w = unbounded
    rng = np.random.default_rng(0)
    d = rng.normal(size=(1000, 3))
    d[:, 2] = np.abs(d[:, 2]) + 0.02
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    far_origin = np.array([3.0, -2.0, 0.8])
    colours = []
    for o in (np.zeros(3) + [0, 0, 0.7], far_origin, far_origin * 100):
        c, t, kind = scenes.unbounded_shade(o, d)
        hit = kind != scenes.KIND_SKY  # the object may be in the way of some
        colours.append(np.where(hit[:, None], np.nan, c))
        assert np.all(np.isinf(t[~hit]))
    np.testing.assert_array_equal(colours[1], colours[2])
    both = ~np.isnan(colours[0][:, 0]) & ~np.isnan(colours[1][:, 0])
    assert both.sum() > 900
    np.testing.assert_array_equal(colours[0][both], colours[1][both])
    # Two cameras looking the same way from different places: their sky pixels are the same.
    low = int(np.argmin(c2w[:, 2, 3]))  # the lowest camera sees the most sky
    moved = c2w[low].copy()
    moved[:, 3] += [1.5, -0.7, 1.0]
    a, _, kind_a = scenes.render_unbounded(c2w[low], SIZE, supersample=SUPERSAMPLE)
    b, _, kind_b = scenes.render_unbounded(moved, SIZE, supersample=SUPERSAMPLE)
    sky = np.all(kind_a == scenes.KIND_SKY, -1) & np.all(kind_b == scenes.KIND_SKY, -1)
    assert sky.sum() > SIZE
    np.testing.assert_array_equal(a[sky], b[sky])
    assert np.ptp(a[sky], axis=0).max() > 0.01  # not one flat colour: a gradient


def test_the_far_ground_averages_out_as_a_cone_sees_it():
    """Far away a pixel covers many squares: its colour is the checker's mean, lit. And every ground
    pixel is its area average: the analytic footprints of 4x4 rays agree with 48x48 point samples."""
    c2w = pose_utils.spherical_pose(30.0, 6.0, 4.0, dtype=torch.float64).numpy()
    size = 48
    rgb, depth, kind = scenes.render_unbounded(c2w, size, supersample=4)
    ground = np.all(kind == scenes.KIND_GROUND, -1)
    far = ground & (depth.min(-1) > 30)
    assert far.sum() >= 32
    assert np.abs(rgb[far] - scenes.ground_mean_colour()).max() < 0.01
    near = ground & (depth.max(-1) < 4)  # nearby, the squares show (their colours are far from the mean)
    assert np.abs(rgb[near] - scenes.ground_mean_colour()).max() > 0.1
    rng = np.random.default_rng(0)
    ys, xs = np.nonzero(ground)
    order = np.argsort(depth[ys, xs].mean(-1))
    pick = order[np.linspace(0, len(order) - 1, 24).astype(int)]  # from the nearest to the farthest
    n, focal = 48, scenes.unbounded_focal(size)
    for y, x in zip(ys[pick], xs[pick]):
        sx = (np.arange(n)[None, :] + rng.uniform(0, 1, (n, n))) / n
        sy = (np.arange(n)[:, None] + rng.uniform(0, 1, (n, n))) / n
        d = np.stack([(x + sx - size / 2) / focal, -(y + sy - size / 2) / focal, -np.ones((n, n))], -1)
        d = d @ c2w[:3, :3].T
        colour, _, k = scenes.unbounded_shade(c2w[:3, 3], d / np.linalg.norm(d, axis=-1, keepdims=True))
        if np.all(k == scenes.KIND_GROUND):
            assert np.abs(colour.mean((0, 1)) - rgb[y, x]).max() < 0.015, (y, x, depth[y, x].mean())


def test_depth_bounds_are_finite_percentiles_of_the_hits(unbounded):
    path, c2w = unbounded
    near, far = raw_rows(path)[:, 15:].T
    dist = np.linalg.norm(c2w[:, :, 3], axis=1)
    assert np.all(near > 0) and np.all(far > near) and np.all(np.isfinite(far))
    assert np.all(near < dist - 0.4)  # nearer than the object's centre (the ground in front is nearer)
    i = int(np.argmin(c2w[:, 2, 3]))  # a camera that sees the sky: far stays finite all the same
    _, depth, kind = scenes.render_unbounded(c2w[i], SIZE, supersample=SUPERSAMPLE)
    assert np.any(kind == scenes.KIND_SKY)
    hit = depth[np.isfinite(depth)]
    np.testing.assert_allclose([near[i], far[i]], np.percentile(hit, scenes.UNB_PERCENTILES), rtol=1e-12)
    assert far[i] < np.inf and far[i] > 10 * near[i]  # the ground reaches far towards the horizon


def test_two_makers_at_once_both_succeed(tmp_path):
    code = (
        'import sys; sys.path.insert(0, sys.argv[1]); import scenes; '
        'scenes.make_unbounded_scene(sys.argv[2], size=8, n_views=3, supersample=1, verbose=False)'
    )
    out = tmp_path / 'scene'
    procs = [
        subprocess.Popen([sys.executable, '-c', code, REPO, str(out)], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ['scene']
    assert len(os.listdir(out / 'images')) == 3 and datasets.load_llff_poses(str(out), 0)[0].shape == (3, 3, 4)
    # The one that comes second, every time: its rename fails on the finished scene, which it keeps.
    before = {f: os.path.getmtime(out / 'images' / f) for f in os.listdir(out / 'images')}
    scenes.make_unbounded_scene(str(out), size=8, n_views=5, supersample=1, verbose=False)
    assert sorted(os.listdir(tmp_path)) == ['scene']
    assert {f: os.path.getmtime(out / 'images' / f) for f in os.listdir(out / 'images')} == before


def test_the_script_writes_the_scene(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'unbounded'
    argv = ['make_unbounded.py', '--out', str(out), '--size', '8', '--n_views', '2', '--supersample', '1']
    monkeypatch.setattr(sys, 'argv', argv)
    runpy.run_path(os.path.join(REPO, 'scripts', 'make_unbounded.py'), run_name='__main__')
    assert 'unbounded scene written' in capsys.readouterr().out
    assert sorted(os.listdir(out / 'images_4')) == ['img_000.png', 'img_001.png']
    monkeypatch.setattr(sys, 'argv', argv[:3] + ['--size', '10'])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, 'scripts', 'make_unbounded.py'), run_name='__main__')
    assert e.value.code == 2 and 'multiple of 4' in capsys.readouterr().err
