"""Camera poses and camera paths.

Pure tensor functions. A pose is a camera-to-world matrix `[..., 3, 4]`
[R | t] in the OpenGL/Blender convention used by NeRF datasets: the camera
looks down its -z axis, +y is up in the image, +x to the right, and t is the
camera centre in world coordinates.
"""
import math

import torch


def normalize(x, eps=1e-12):
    """x / |x| along the last axis, `[..., C]`."""
    return x / torch.linalg.norm(x, dim=-1, keepdim=True).clamp_min(eps)


def look_at(eye, target, up):
    """Poses of cameras at `eye` looking at `target`.

    Args:
      eye, target, up: `[..., 3]` (broadcastable); `up` need not be
        orthogonal to the viewing direction, only not parallel to it.

    Returns:
      `[..., 3, 4]` camera-to-world matrices.
    """
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    back = normalize(eye - target)            # camera +z points away from the target
    right = normalize(torch.linalg.cross(up, back, dim=-1))
    cam_up = torch.linalg.cross(back, right, dim=-1)
    return torch.stack([right, cam_up, back, eye], dim=-1)


def spherical_pose(azimuth_deg, elevation_deg, radius, dtype=torch.float32, device=None):
    """Cameras on a sphere around the origin, looking at it, z up (Blender).

    Args:
      azimuth_deg, elevation_deg: `[...]` angles in degrees (tensors or
        floats); azimuth is measured in the xy-plane from +x, elevation from
        the xy-plane towards +z.
      radius: distance from the origin.

    Returns:
      `[..., 3, 4]` camera-to-world matrices.
    """
    az = torch.as_tensor(azimuth_deg, dtype=dtype, device=device) * (math.pi / 180)
    el = torch.as_tensor(elevation_deg, dtype=dtype, device=device) * (math.pi / 180)
    az, el = torch.broadcast_tensors(az, el)
    eye = radius * torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], -1)
    up = torch.tensor([0., 0., 1.], dtype=dtype, device=device).expand_as(eye)
    # Straight above or below, z is parallel to the view: use +y as up there.
    alt_up = torch.tensor([0., 1., 0.], dtype=dtype, device=device).expand_as(eye)
    vertical = (torch.cos(el).abs() < 1e-6)[..., None]
    up = torch.where(vertical, alt_up, up)
    return look_at(eye, torch.zeros_like(eye), up)
