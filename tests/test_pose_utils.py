import math

import pytest
import torch

import pose_utils
from conftest import FERN, needs_fern


def check_rotation(poses):
    r = poses[..., :3].double()
    eye = torch.eye(3, dtype=torch.float64).expand_as(r)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(r.shape[:-2], dtype=torch.float64), atol=1e-5, rtol=0)


def forward(poses):
    return -poses[..., 2]  # cameras look down -z


@pytest.mark.parametrize('elevation', [-20.0, 0.0, 30.0, 89.0])
def test_spherical_path_looks_at_origin_from_radius_and_elevation(elevation):
    poses = pose_utils.spherical_path(12, 4.0, elevation)
    assert poses.shape == (12, 3, 4)
    check_rotation(poses)
    centre = poses[:, :, 3]
    torch.testing.assert_close(centre.norm(dim=-1), torch.full((12,), 4.0))
    torch.testing.assert_close(
        torch.rad2deg(torch.asin(centre[:, 2] / 4.0)), torch.full((12,), elevation), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(forward(poses), -centre / 4.0, atol=1e-5, rtol=0)
    # Image up points towards +z (no roll), and the azimuths cover the circle evenly.
    assert torch.all(poses[:, 2, 1] > 0)
    az = torch.atan2(centre[:, 1], centre[:, 0])
    steps = torch.remainder(az[1:] - az[:-1], 2 * math.pi)
    torch.testing.assert_close(steps, torch.full((11,), 2 * math.pi / 12), atol=1e-4, rtol=0)


def test_zoom_path_changes_distance_smoothly():
    poses = pose_utils.zoom_path(60, 2.5, 6.0, 30.0)
    check_rotation(poses)
    dist = poses[:, :, 3].norm(dim=-1)
    assert dist.max() == pytest.approx(6.0) and dist.min() == pytest.approx(2.5, rel=0.01)
    ratio = dist[1:] / dist[:-1]
    assert ratio.max() < 1.06 and ratio.min() > 1 / 1.06  # continuous: small steps
    torch.testing.assert_close(forward(poses), -poses[:, :, 3] / dist[:, None], atol=1e-5, rtol=0)


def test_look_at_and_recenter():
    eye = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.0, 1.0]])
    poses = pose_utils.look_at(eye, torch.zeros(2, 3), torch.tensor([0.0, 0.0, 1.0]))
    check_rotation(poses)
    torch.testing.assert_close(forward(poses), -eye / eye.norm(dim=-1, keepdim=True))
    centred = pose_utils.recenter_poses(poses.double())
    torch.testing.assert_close(pose_utils.poses_avg(centred), torch.eye(4, dtype=torch.float64)[:3], atol=1e-9, rtol=0)


@needs_fern
def test_spiral_stays_near_the_average_pose_and_looks_forward():
    import datasets

    data = datasets.get_dataset('llff', FERN, 'train', factor=8)
    poses = pose_utils.spiral_path(data.all_cam2world, data.bounds, n_frames=120)
    assert poses.shape == (120, 3, 4)
    check_rotation(poses)
    avg = pose_utils.poses_avg(data.all_cam2world.double()).float()
    spread = (data.all_cam2world[:, :, 3] - avg[:, 3]).norm(dim=-1).max()
    offsets = (poses[:, :, 3] - avg[:, 3]).norm(dim=-1)
    assert offsets.max() <= 2 * spread and offsets.min() > 0
    cos = (forward(poses) * forward(avg)).sum(-1)
    assert cos.min() > math.cos(math.radians(15))
    # The cameras converge on a focus point in front of the average camera.
    assert torch.all(forward(poses)[:, 2] < 0)
