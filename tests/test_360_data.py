"""mip-NeRF 360 data: the '360' loader (on the real fern, read as a 360 scene), the 'capture' loader (the
real fox, transforms.json), multinerf's camera normalization and ellipse path, undistortion, and
scripts/download_360.sh (offline, with file:// archives)."""

import json
import math
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import config
import datasets
import pose_utils
import ray_utils
from conftest import FERN, REPO, SHARED, needs_fern

FOX = os.path.join(SHARED, 'captures', 'fox')
NO_FOX = (
    f'real fox capture not found at {os.path.normpath(FOX)}: set MIPNERF_SHARED_DATA to a folder holding '
    'captures/fox (default ../shared/data)'
)
needs_fox = pytest.mark.skipif(not os.path.isdir(FOX), reason=NO_FOX)


def fox_meta():
    with open(os.path.join(FOX, 'transforms.json')) as f:
        return json.load(f)


def multinerf_transform_poses_pca(poses):
    """multinerf's camera_utils.transform_poses_pca, in numpy (the [-1, 1]^3 cube rule)."""
    t = poses[:, :3, 3]
    t_mean = t.mean(0)
    t = t - t_mean
    eigval, eigvec = np.linalg.eig(t.T @ t)
    rot = eigvec[:, np.argsort(eigval)[::-1]].T
    if np.linalg.det(rot) < 0:
        rot = np.diag([1, 1, -1]) @ rot
    out = np.concatenate([rot @ poses[:, :, :3], (t @ rot.T)[:, :, None]], -1)
    if out.mean(0)[2, 1] < 0:
        out = np.diag([1, -1, -1]) @ out
    out[:, :3, 3] /= np.abs(out[:, :3, 3]).max()
    return out


def assert_multinerf(raw, poses):
    """`poses` (float32, the ball rule) are multinerf's transform of `raw` rescaled: the cube rule equals the
    numpy port up to the half turn about z that np.linalg.eig's signs leave free."""
    ref = multinerf_transform_poses_pca(raw)
    cube, _ = pose_utils.transform_poses_pca(torch.from_numpy(raw), fit='cube')
    cube = cube.numpy()
    assert any(np.allclose(cube, flip @ ref, atol=1e-9) for flip in (np.eye(3), np.diag([-1.0, -1.0, 1.0])))
    radius = np.linalg.norm(cube[:, :, 3], axis=-1).max()
    np.testing.assert_allclose(poses[:, :, :3], cube[:, :, :3], atol=1e-6)
    np.testing.assert_allclose(poses[:, :, 3], cube[:, :, 3] / radius, atol=1e-6)


def relative_geometry(poses):
    """Pairwise centre distances `[N, N]` and relative rotations R_i^T R_j `[N, N, 3, 3]`."""
    c = poses[:, :, 3]
    dist = np.linalg.norm(c[:, None] - c[None], axis=-1)
    r = poses[:, :, :3]
    return dist, np.einsum('iab,jac->ijbc', r, r)


def check_normalized(raw, poses):
    """`poses` are `raw` normalized: in the unit ball (one on its surface), rotations, the same relative geometry."""
    radius = np.linalg.norm(poses[:, :, 3], axis=-1)
    assert radius.max() == pytest.approx(1.0, abs=1e-6) and np.all(radius <= 1 + 1e-6)
    np.testing.assert_allclose(poses[:, :, 3].mean(0), 0, atol=1e-6)  # centred at the cameras' mean
    rot = poses[:, :, :3]
    np.testing.assert_allclose(np.linalg.det(rot), 1, atol=1e-5)
    np.testing.assert_allclose(rot.transpose(0, 2, 1) @ rot, np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    assert poses[:, 2, 1].mean() >= 0  # z up: the cameras' mean up vector points to +z
    d_raw, r_raw = relative_geometry(raw)
    d_new, r_new = relative_geometry(poses)
    off = ~np.eye(len(raw), dtype=bool)
    ratio = d_new[off] / d_raw[off]
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-5)  # one scale for all
    np.testing.assert_allclose(r_new, r_raw, atol=1e-5)  # relative rotations unchanged
    return ratio.mean()


# ----------------------------------------------------------------------------
# The datasets' registration.


def test_registered_with_multinerf_defaults():
    assert set(config.DATASET_NAMES) == set(datasets.DATASETS) == set(datasets.LOADERS)
    d = datasets.DATASETS['360']
    assert (d.folder, d.script, d.scene) == ('360_v2', 'scripts/download_360.sh', 'garden')
    assert os.path.isfile(os.path.join(REPO, d.script))
    cfg = config.get_config(['--dataset_name', '360'], need_data=False)
    assert (cfg.near, cfg.far, cfg.factor, cfg.white_bkgd, cfg.ray_shape, cfg.density_noise, cfg.lindisp) == (
        0.2,
        1e6,
        4,
        False,
        'cone',
        0.0,
        False,
    )
    assert (cfg.batching, cfg.llffhold, cfg.base_dir) == ('all_images', 8, os.path.join('data', '360_v2', 'garden'))
    cfg = config.get_config(['--dataset_name', 'capture'], need_data=False)
    assert (cfg.near, cfg.far, cfg.factor, cfg.base_dir) == (0.2, 1e6, 2, os.path.join('data', 'captures', 'fox'))


# ----------------------------------------------------------------------------
# The camera normalization and the ellipse path (pose_utils).


def test_transform_poses_pca_is_multinerfs_up_to_its_sign_freedom():
    """The cube rule is multinerf's, up to the half turn about z that np.linalg.eig's signs leave free;
    the ball rule (the default) scales the same poses so that the farthest centre is at distance 1."""
    gen = torch.Generator().manual_seed(0)
    # A ring of cameras, tilted and shifted, looking inwards, with up vectors along the ring's normal.
    theta = torch.linspace(0, 2 * math.pi, 24, dtype=torch.float64)[:-1]
    ring = torch.stack([3 * torch.cos(theta), 2 * torch.sin(theta), 0.3 * torch.sin(3 * theta)], -1)
    poses = pose_utils.look_at(ring, torch.zeros(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0]).double())
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))
    poses = torch.cat([q @ poses[:, :, :3], (poses[:, :, 3] @ q.T + torch.tensor([5.0, -1.0, 2.0]))[..., None]], -1)
    ref = multinerf_transform_poses_pca(poses.numpy())
    cube, transform = pose_utils.transform_poses_pca(poses, fit='cube')
    half_turn = np.diag([-1.0, -1.0, 1.0])
    assert any(np.allclose(cube.numpy(), flip @ ref, atol=1e-9) for flip in (np.eye(3), half_turn))
    ball, transform = pose_utils.transform_poses_pca(poses)
    radius = np.linalg.norm(cube[:, :, 3].numpy(), axis=-1)
    np.testing.assert_allclose(ball[:, :, 3].numpy(), cube[:, :, 3].numpy() / radius.max(), atol=1e-12)
    np.testing.assert_allclose(ball[:, :, :3].numpy(), cube[:, :, :3].numpy(), atol=1e-12)
    # The transform maps old centres to the new ones; the ring lands in the xy-plane, z up.
    moved = (transform @ pose_utils.to_homogeneous(poses))[:, :3, 3]
    torch.testing.assert_close(moved, ball[:, :, 3], atol=1e-12, rtol=0)
    assert ball[:, 2, 3].abs().max() < 0.15 and ball[:, 2, 1].mean() > 0.99
    check_normalized(poses.numpy(), ball.numpy())


def test_focus_point_is_where_the_optical_axes_meet():
    target = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    eyes = torch.tensor([[2.0, 0, 0], [0, 2, 0.5], [-1, -1, 1], [0.5, 0.5, -2]], dtype=torch.float64)
    poses = pose_utils.look_at(eyes, target, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(eyes))
    poses = poses.clone()
    poses[3] = pose_utils.look_at(eyes[3], target, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(pose_utils.focus_point(poses), target, atol=1e-9, rtol=0)


def check_ellipse_path(poses, n_frames=60):
    """generate_ellipse_path(poses): every frame looks at the focus point, on the ellipse of the camera
    offsets' 90th percentiles, at the cameras' mean height (z = 0), evenly spaced, up the cameras' way."""
    poses = poses.double()
    focus = pose_utils.focus_point(poses)
    path = pose_utils.generate_ellipse_path(poses, n_frames).double()
    assert path.shape == (n_frames, 3, 4)
    centres = path[:, :, 3]
    # The optical axis (-z) of each frame goes through the focus point.
    to_focus = focus - centres
    along = (to_focus * -path[:, :, 2]).sum(-1)
    assert torch.all(along > 0)
    miss = torch.linalg.norm(to_focus - along[:, None] * -path[:, :, 2], dim=-1)
    assert miss.max() < 1e-5
    # Rotations.
    rot = path[:, :, :3]
    torch.testing.assert_close(
        rot.transpose(1, 2) @ rot, torch.eye(3, dtype=rot.dtype).expand_as(rot), atol=1e-5, rtol=0
    )
    # On the ellipse around the focus point's (x, y), at the cameras' mean height, within their heights.
    cams = poses[:, :, 3]
    offset = torch.stack([focus[0], focus[1], torch.zeros((), dtype=focus.dtype)])
    semi = torch.quantile((cams - offset).abs(), 0.9, dim=0)
    e = ((centres[:, :2] - focus[:2]) / semi[:2]).square().sum(-1)
    torch.testing.assert_close(e, torch.ones_like(e), atol=1e-5, rtol=0)
    assert torch.all(centres[:, 2].abs() < 1e-6) and cams[:, 2].min() < 0 < cams[:, 2].max()
    # Nearly constant speed.
    steps = torch.linalg.norm(torch.roll(centres, -1, 0) - centres, dim=-1)
    assert steps.max() / steps.min() < 1.05
    # Up: the world axis nearest the cameras' mean up vector.
    mean_up = poses[:, :, 1].mean(0)
    axis = int(mean_up.abs().argmax())
    assert torch.all(path[:, axis, 1] * torch.sign(mean_up[axis]) > 0)
    # Height variation: between the 10th and 90th percentile heights.
    varied = pose_utils.generate_ellipse_path(poses, n_frames, z_variation=1.0)[:, 2, 3].double()
    lo, hi = torch.quantile(cams[:, 2], 0.1), torch.quantile(cams[:, 2], 0.9)
    assert varied.min() >= lo - 1e-5 and varied.max() <= hi + 1e-5 and varied.max() - varied.min() > 0.9 * (hi - lo)


# ----------------------------------------------------------------------------
# The 360 loader on the real fern (read as a 360 scene).


@needs_fern
def test_fern_as_360_scene():
    train = datasets.get_dataset('360', FERN, 'train', factor=8)
    test = datasets.get_dataset('360', FERN, 'test', factor=8)
    assert (len(train), len(test)) == (17, 3)  # every 8th of 20 held out: 0, 8, 16
    assert train.images.shape[1:] == (378, 504, 3) and train.ndc is None and test.ndc is None
    assert torch.all(train.near == 0.2) and torch.all(train.far == 1e6)
    all_c2w = train.all_cam2world
    torch.testing.assert_close(test.cam2world, all_c2w[[0, 8, 16]])
    raw, bounds, focal = datasets.read_poses_bounds(FERN, 8)
    scale = check_normalized(raw, all_c2w.double().numpy())
    assert_multinerf(raw, all_c2w.numpy())
    np.testing.assert_allclose(train.bounds.numpy(), bounds * scale, rtol=1e-5)
    full_focal = np.load(os.path.join(FERN, 'poses_bounds.npy'))[0, 14]
    assert train.focal == pytest.approx(full_focal / 8, rel=1e-6) and focal == pytest.approx(full_focal / 8)
    # Ordinary pinhole rays from the camera centre, with the existing cone radii.
    rays = test.rays_of_image(1)
    c2w = test.cam2world[1]
    torch.testing.assert_close(rays.origins, c2w[:, 3].expand(378, 504, 3))
    y, x = 7, 5
    cam = torch.tensor([(x + 0.5 - 252) / test.focal, -(y + 0.5 - 189) / test.focal, -1.0])
    torch.testing.assert_close(rays.directions[y, x], c2w[:, :3] @ cam, atol=1e-6, rtol=0)
    torch.testing.assert_close(rays.radii, torch.full_like(rays.radii, 2 / math.sqrt(12) / test.focal))
    assert torch.all(rays.near == 0.2) and torch.all(rays.far == 1e6)
    check_ellipse_path(all_c2w)


# ----------------------------------------------------------------------------
# The capture loader on the real fox.


def distort(u, v, fx, fy, cx, cy, k1, k2, p1, p2, k3=0.0):
    """OpenCV's radial-tangential model by hand: the distorted pixel position of the undistorted (u, v)
    (pixel-edge coordinates, pixel centres at +0.5)."""
    x, y = (u - cx) / fx, (v - cy) / fy
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2**3
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return fx * xd + cx, fy * yd + cy


def fox_intrinsics():
    m = fox_meta()
    return (m['fl_x'], m['fl_y'], m['cx'], m['cy']), (m['k1'], m['k2'], m['p1'], m['p2'])


@needs_fox
def test_fox_loads_with_its_intrinsics_and_every_8th_frame_as_test():
    train = datasets.get_dataset('capture', FOX, 'train', factor=8)
    test = datasets.get_dataset('capture', FOX, 'test', factor=8)
    assert (len(train), len(test)) == (35, 5)
    assert test.images.shape == (5, 240, 135, 3) and test.ndc is None and test.bounds is None
    (fx, fy, cx, cy), _ = fox_intrinsics()
    expected = datasets.pix2cam_from_intrinsics(fx / 8, fy / 8, cx / 8, cy / 8)
    torch.testing.assert_close(test.pix2cam, expected.expand(5, 3, 3))
    assert test.focal == pytest.approx(fx / 8, rel=1e-6)
    # Frames sorted by file_path; every 8th (0, 8, ..., 32) is a test frame.
    frames = sorted(fox_meta()['frames'], key=lambda f: f['file_path'])
    raw = np.array([f['transform_matrix'] for f in frames])[:, :3, :4]
    all_c2w = test.all_cam2world
    torch.testing.assert_close(test.cam2world, all_c2w[[0, 8, 16, 24, 32]])
    torch.testing.assert_close(train.cam2world, all_c2w[[i for i in range(40) if i % 8]])
    check_normalized(raw, all_c2w.double().numpy())
    assert_multinerf(raw, all_c2w.numpy())
    # The images are the undistorted photos, area-downsampled.
    photo = datasets.read_image(os.path.join(FOX, frames[8]['file_path']))
    (fx, fy, cx, cy), dist = fox_intrinsics()
    want = datasets.area_downsample(datasets.undistort_image(photo, fx, fy, cx, cy, dist), 8)
    np.testing.assert_allclose(test.images[1].numpy(), want, atol=1e-6)
    check_ellipse_path(all_c2w)


@needs_fox
def test_fox_rays_use_the_off_centre_intrinsics():
    data = datasets.get_dataset('capture', FOX, 'test', factor=8)
    (fx, fy, cx, cy), _ = fox_intrinsics()
    c2w = data.cam2world[2].double()
    # The ray through the principal point goes along the camera's -z axis.
    o, d, viewdirs, _ = ray_utils.pixel_rays(
        data.pix2cam[2].double(), c2w, torch.tensor(cx / 8 - 0.5).double(), torch.tensor(cy / 8 - 0.5).double()
    )
    torch.testing.assert_close(d, -c2w[:, 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(o, c2w[:, 3])
    # Any pixel: ((x + 0.5 - cx) / fx, -(y + 0.5 - cy) / fy, -1) at the image's scale.
    rays = data.rays_of_image(2)
    for y, x in ((0, 0), (239, 134), (100, 30)):
        cam = torch.tensor([(x + 0.5 - cx / 8) / (fx / 8), -(y + 0.5 - cy / 8) / (fy / 8), -1.0], dtype=torch.float64)
        torch.testing.assert_close(rays.directions[y, x].double(), c2w[:, :3] @ cam, atol=1e-6, rtol=0)
    assert rays.origins.shape == (240, 135, 3) and torch.all(rays.near == 0.2)


@needs_fox
def test_undistortion_takes_each_pixel_from_its_distorted_position():
    """On a smooth synthetic image of the fox's size: the undistorted image at pixel centre p is the
    original at distort(p) (the hand-written OpenCV model, the file's k1 k2 p1 p2), to interpolation error,
    where a half-pixel slip of the principal point would be 50 times larger."""
    (fx, fy, cx, cy), dist = fox_intrinsics()
    h, w = 1920, 1080
    v, u = np.mgrid[0:h, 0:w] + 0.5

    def f(u, v):
        return 0.5 + 0.25 * (np.sin(u / 20) + np.cos(v / 15))

    img = np.stack([f(u, v), f(v, u), 1 - f(u, v)], -1).astype(np.float32)
    out = datasets.undistort_image(img, fx, fy, cx, cy, dist)
    assert out.shape == img.shape
    ud, vd = distort(u, v, fx, fy, cx, cy, *dist)
    inside = (ud > 1) & (ud < w - 1) & (vd > 1) & (vd < h - 1)
    assert inside.mean() > 0.97 and np.hypot(ud - u, vd - v).max() > 5  # the lens moves pixels a lot
    want = np.stack([f(ud, vd), f(vd, ud), 1 - f(ud, vd)], -1)
    err = np.abs(out - want)[inside]
    assert err.max() < 1e-3
    slip = np.abs(out[..., 0] - f(ud + 0.5, vd + 0.5))[inside]
    assert slip.max() > 50 * err.max()
    # No distortion: the image as it was.
    assert datasets.undistort_image(img, fx, fy, cx, cy, (0, 0, 0, 0)) is img


@needs_fox
def test_undistortion_of_a_real_photo_at_known_points():
    """The undistorted photo at pixel (x, y) is the photo, bilinearly sampled, at the distorted position."""
    (fx, fy, cx, cy), dist = fox_intrinsics()
    photo = datasets.read_image(os.path.join(FOX, 'images', '0001.jpg'))
    out = datasets.undistort_image(photo, fx, fy, cx, cy, dist)
    ys, xs = np.mgrid[40:1880:23, 40:1040:17]
    ud, vd = distort(xs + 0.5, ys + 0.5, fx, fy, cx, cy, *dist)

    def sample(u, v):  # bilinear, at pixel-edge coordinates (pixel centres at +0.5)
        px, py = u - 0.5, v - 0.5
        x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
        ax, ay = (px - x0)[..., None], (py - y0)[..., None]
        return (
            photo[y0, x0] * (1 - ax) * (1 - ay)
            + photo[y0, x0 + 1] * ax * (1 - ay)
            + photo[y0 + 1, x0] * (1 - ax) * ay
            + photo[y0 + 1, x0 + 1] * ax * ay
        )

    got = out[ys, xs]
    assert np.abs(got - sample(ud, vd)).max() < 1e-4
    assert np.abs(got - sample(ud + 0.5, vd + 0.5)).mean() > 1e-3  # a half-pixel slip shows
    assert np.abs(got - photo[ys, xs]).mean() > 1e-2  # not the photo as it was


# ----------------------------------------------------------------------------
# Bad captures: one-line DataErrors naming the file and the fix.


@pytest.fixture
def fox_copy(tmp_path):
    """The fox's transforms.json in a fresh folder, its images linked: returns (scene, meta, save)."""
    if not os.path.isdir(FOX):
        pytest.skip(NO_FOX)
    scene = tmp_path / 'fox'
    scene.mkdir()
    os.symlink(os.path.abspath(os.path.join(FOX, 'images')), scene / 'images')
    meta = fox_meta()

    def save():
        (scene / 'transforms.json').write_text(json.dumps(meta))
        return str(scene)

    return scene, meta, save


def load_error(path, match, **kw):
    with pytest.raises(datasets.DataError, match=match) as e:
        datasets.get_dataset('capture', path, 'test', factor=8, **kw)
    assert '\n' not in str(e.value)
    return str(e.value)


def test_missing_fl_x(fox_copy):
    scene, meta, save = fox_copy
    del meta['fl_x']
    data = datasets.get_dataset('capture', save(), 'test', factor=8)  # camera_angle_x gives it
    assert data.focal * 8 == pytest.approx(0.5 * 1080 / math.tan(0.5 * meta['camera_angle_x']), rel=1e-6)
    del meta['camera_angle_x']
    msg = load_error(save(), r'transforms.json has neither fl_x nor camera_angle_x \(for frame 0 \(images/0001.jpg\)\)')
    assert 'add the focal length in pixels' in msg


def test_nan_transform_matrix(fox_copy):
    scene, meta, save = fox_copy
    meta['frames'][3]['transform_matrix'][1][2] = float('nan')
    name = meta['frames'][3]['file_path']
    load_error(save(), rf'transforms.json: frame 3 \({name}\) has NaN or inf in its transform_matrix: fix')
    meta['frames'][3]['transform_matrix'] = [[1, 0, 0], [0, 1, 0]]
    load_error(save(), r'frame 3 .* has a transform_matrix of shape \(2, 3\), not 4x4')


def test_missing_image(fox_copy):
    scene, meta, save = fox_copy
    meta['frames'][5]['file_path'] = 'images/gone.jpg'
    load_error(
        save(),
        r'image .*images/gone.jpg \(file_path of frame 5 in .*transforms.json\) is missing: '
        'restore the image or fix its file_path',
    )


def test_other_bad_captures(fox_copy):
    scene, meta, save = fox_copy
    meta['w'] = 1000
    load_error(save(), r'transforms.json: w is 1000, but the image of frame 0 \(images/0001.jpg\) is 1080x1920')
    meta['w'] = 1080
    meta['k1'] = 'big'
    load_error(save(), r"transforms.json: k1 is 'big', not a finite number")
    meta['k1'] = 0.05
    meta['camera_model'] = 'OPENCV_FISHEYE'
    load_error(save(), r"camera_model 'OPENCV_FISHEYE' is not supported \(only OPENCV, PINHOLE, SIMPLE_PINHOLE\)")
    del meta['camera_model']
    meta['frames'][8]['fl_y'] = -3  # a frame's own intrinsics (nerfstudio) override the scene's
    name = meta['frames'][8]['file_path']
    load_error(save(), rf'transforms.json: frame 8 \({name}\): fl_y is -3, not a positive number')
    meta['frames'] = []
    load_error(save(), r'transforms.json is malformed: it needs a non-empty list "frames"')
    os.remove(scene / 'transforms.json')
    load_error(str(scene), r'transforms.json is missing: make it with instant-ngp colmap2nerf.py')


# ----------------------------------------------------------------------------
# scripts/download_360.sh, offline.

SCENES = 'bicycle bonsai counter garden kitchen room stump'.split()


def make_360_zip(path, scenes, skip=None):
    """An archive in the official layout: scene folders at the top level, and the two notes."""
    with zipfile.ZipFile(path, 'w') as z:
        for s in scenes:
            for f in ('poses_bounds.npy', 'images/a.JPG', 'images_2/a.JPG', 'images_4/a.JPG', 'images_8/a.JPG'):
                if f'{s}/{f}' != skip:
                    z.writestr(f'{s}/{f}', 'x')
        for note in ('flowers.txt', 'treehill.txt'):
            z.writestr(note, 'in 360_extra_scenes.zip')
    return f'file://{path}'


@pytest.mark.skipif(not (shutil.which('curl') and shutil.which('unzip')), reason='curl and unzip are needed')
def test_download_360_script(tmp_path):
    data = tmp_path / 'data'

    def run(*args, **env):
        return subprocess.run(
            ['bash', os.path.join(REPO, 'scripts', 'download_360.sh'), str(data), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=120,
        )

    bad = make_360_zip(tmp_path / 'bad.zip', SCENES, skip='stump/images_8/a.JPG')
    res = run(M360_URL=bad)
    assert res.returncode != 0
    assert res.stderr.strip().endswith(f'layout is incomplete: missing {data}/360_v2/stump/images_8/')
    url = make_360_zip(tmp_path / '360_v2.zip', SCENES)
    extra = make_360_zip(tmp_path / 'extra.zip', ['flowers', 'treehill'])
    os.remove(data / '360_v2.zip')  # the incomplete archive stays for a retry; this one is fresh
    res = run('--extra', M360_URL=url, M360_EXTRA_URL=extra)
    assert res.returncode == 0, res.stderr
    for s in SCENES + ['flowers', 'treehill']:
        assert (data / '360_v2' / s / 'images_4' / 'a.JPG').is_file()
    assert not (data / '360_v2.zip').exists() and not (data / '360_extra_scenes.zip').exists()
    assert not [p for p in os.listdir(data) if p.startswith('.unpack')]
    res = run(M360_URL='file:///nonexistent.zip')
    assert res.returncode == 0 and res.stdout.strip() == f'mip-NeRF 360 scenes already in {data}/360_v2'


@pytest.mark.skipif(not (shutil.which('curl') and shutil.which('unzip')), reason='curl and unzip are needed')
def test_download_360_relative_data_dir_is_the_callers(tmp_path):
    for s in SCENES:
        for d in ('images', 'images_2', 'images_4', 'images_8'):
            (tmp_path / 'rel' / '360_v2' / s / d).mkdir(parents=True)
        (tmp_path / 'rel' / '360_v2' / s / 'poses_bounds.npy').write_bytes(b'x')
    res = subprocess.run(
        ['bash', os.path.join(REPO, 'scripts', 'download_360.sh'), 'rel'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, 'M360_URL': 'file:///nonexistent.zip'},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f'mip-NeRF 360 scenes already in {tmp_path}/rel/360_v2'
    assert not os.path.exists(os.path.join(REPO, 'rel'))
