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
    back = normalize(eye - target)  # camera +z points away from the target
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
    up = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=device).expand_as(eye)
    # Straight above or below, z is parallel to the view: use +y as up there.
    alt_up = torch.tensor([0.0, 1.0, 0.0], dtype=dtype, device=device).expand_as(eye)
    vertical = (torch.cos(el).abs() < 1e-6)[..., None]
    up = torch.where(vertical, alt_up, up)
    return look_at(eye, torch.zeros_like(eye), up)


def viewmatrix(back, up, position):
    """A pose `[..., 3, 4]` whose +z axis is `back`, with +y as close to `up` as possible."""
    z = normalize(back)
    x = normalize(torch.linalg.cross(up, z, dim=-1))
    y = normalize(torch.linalg.cross(z, x, dim=-1))
    return torch.stack([x, y, z, position], dim=-1)


def poses_avg(poses):
    """The average pose of `[N, 3, 4]` poses, as the official release: mean
    centre, normalized summed +z axis, summed +y axis as up. Returns `[3, 4]`."""
    return viewmatrix(poses[:, :, 2].sum(0), poses[:, :, 1].sum(0), poses[:, :, 3].mean(0))


def to_homogeneous(poses):
    """`[..., 3, 4]` -> `[..., 4, 4]`."""
    bottom = torch.zeros(poses.shape[:-2] + (1, 4), dtype=poses.dtype, device=poses.device)
    bottom[..., 0, 3] = 1
    return torch.cat([poses, bottom], dim=-2)


def recenter_poses(poses):
    """Express `[N, 3, 4]` poses in the frame of their average pose."""
    avg = to_homogeneous(poses_avg(poses))
    return (torch.linalg.inv(avg) @ to_homogeneous(poses))[:, :3, :4]


def spherical_path(n_frames, radius, elevation_deg=30.0, dtype=torch.float32, device=None):
    """A 360-degree orbit around the origin at `radius`, `elevation_deg` above the
    xy-plane (Blender and Multicam scenes, z up). Returns `[n_frames, 3, 4]`."""
    azimuth = torch.linspace(0.0, 360.0, n_frames + 1, dtype=torch.float64)[:-1]
    return spherical_pose(azimuth, torch.full_like(azimuth, elevation_deg), radius).to(dtype=dtype, device=device)


def zoom_path(n_frames, radius_near, radius_far, elevation_deg=30.0, n_rots=1.0):
    """An orbit whose distance to the origin swings from `radius_far` to
    `radius_near` and back (geometrically, so the pixel footprint on the object
    changes at a steady rate): one zoom in and out over `n_rots` turns.
    Returns `[n_frames, 3, 4]`."""
    s = torch.arange(n_frames, dtype=torch.float64) / n_frames
    blend = 0.5 * (1 - torch.cos(2 * math.pi * s))  # 0 -> 1 -> 0
    radius = radius_far * (radius_near / radius_far) ** blend
    azimuth = 360.0 * n_rots * s
    poses = spherical_pose(azimuth, torch.full_like(azimuth, elevation_deg), 1.0, dtype=torch.float64)
    poses[:, :, 3] *= radius[:, None]
    return poses.float()


def spiral_path(poses, bounds, n_frames=120, n_rots=2, zrate=0.5):
    """The official forward-facing spiral (LLFF): around the average pose, with
    radii the 90th percentile of the camera offsets, looking at a focus depth
    between the nearest and (5 x) farthest bounds.

    Args:
      poses: `[N, 3, 4]` re-centred poses; bounds: `[N, 2]` depth bounds.

    Returns:
      `[n_frames, 3, 4]` poses.
    """
    poses, bounds = poses.double(), bounds.double()
    c2w = poses_avg(poses)
    up = normalize(poses[:, :, 1].sum(0))
    close_depth, inf_depth = bounds.min() * 0.9, bounds.max() * 5.0
    dt = 0.75
    focus = 1.0 / ((1.0 - dt) / close_depth + dt / inf_depth)
    rads = torch.quantile(poses[:, :, 3].abs(), 0.9, dim=0)
    rads = torch.cat([rads, torch.ones(1, dtype=rads.dtype)])
    out = []
    for theta in torch.linspace(0.0, 2.0 * math.pi * n_rots, n_frames + 1, dtype=torch.float64)[:-1]:
        offset = (
            torch.stack(
                [torch.cos(theta), -torch.sin(theta), -torch.sin(theta * zrate), torch.ones((), dtype=theta.dtype)]
            )
            * rads
        )
        centre = c2w @ offset
        target = c2w @ torch.tensor([0.0, 0.0, -focus, 1.0], dtype=c2w.dtype)
        out.append(viewmatrix(centre - target, up, centre))
    return torch.stack(out).float()


# ----------------------------------------------------------------------------
# Unbounded 360-degree scenes (mip-NeRF 360; multinerf's camera_utils).


def focus_point(poses):
    """The point nearest, in least squares, to the optical axes of `[N, 3, 4]` poses. Returns `[3]`.

    Each camera contributes the squared distance from the point to the line through its centre
    along its z axis (multinerf's `focus_point_fn`).
    """
    poses = poses.double()
    axes, centres = poses[:, :, 2:3], poses[:, :, 3:4]
    eye = torch.eye(3, dtype=poses.dtype, device=poses.device)
    m = eye - axes @ axes.transpose(1, 2)  # projects out each axis: symmetric and idempotent
    return torch.linalg.solve(m.mean(0), (m @ centres).mean(0))[:, 0]


def transform_poses_pca(poses, fit='ball'):
    """Re-centre, rotate and scale `[N, 3, 4]` poses for an unbounded (360-degree) scene.

    As multinerf's `transform_poses_pca`: the camera centres' mean moves to the origin; the world
    turns so that the principal axes of the centres become x, y, z (largest spread first: a ring of
    cameras lies in the xy-plane), z chosen so that the cameras' mean up vector has z >= 0; then one
    scale makes the centres fit the unit region. `fit='ball'` (the default) scales the farthest
    centre to distance 1, so every camera lies inside the unit ball that the mip-NeRF 360 contraction
    leaves unchanged; `fit='cube'` is multinerf's rule (the largest |coordinate| is 1: inside
    [-1, 1]^3, up to sqrt(3) from the origin). The eigenvectors' signs, which multinerf leaves to
    `np.linalg.eig`, are fixed here (each axis's largest component positive before the handedness
    and up flips), so the result is deterministic.

    Returns:
      poses `[N, 3, 4]` (float64: rotations stay rotations, centres scaled) and the `[4, 4]` similarity
      transform (float64) that maps old world points to new ones: `new = transform @ [old, 1]`.
    """
    if fit not in ('ball', 'cube'):
        raise ValueError(f'fit must be ball or cube, got {fit!r}')
    poses = poses.double()
    centres = poses[:, :, 3]
    mean = centres.mean(0)
    offsets = centres - mean
    _, vecs = torch.linalg.eigh(offsets.T @ offsets)  # ascending eigenvalues
    rot = vecs.flip(-1).T.clone()  # rows: the principal axes, largest spread first
    rows = torch.arange(3)
    rot *= torch.sign(rot[rows, rot.abs().argmax(1)])[:, None]
    if torch.linalg.det(rot) < 0:
        rot[2] = -rot[2]
    if (rot @ poses[:, :, 1].T)[2].mean() < 0:  # the cameras' up vectors point down: turn 180 degrees about x
        rot = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=rot.dtype)) @ rot
    new_centres = offsets @ rot.T
    size = new_centres.norm(dim=-1).max() if fit == 'ball' else new_centres.abs().max()
    scale = 1.0 / size if size > 0 else torch.ones((), dtype=rot.dtype)
    out = torch.cat([rot @ poses[:, :, :3], (scale * new_centres)[:, :, None]], dim=-1)
    transform = torch.eye(4, dtype=rot.dtype)
    transform[:3, :3] = scale * rot
    transform[:3, 3] = -scale * (rot @ mean)
    return out, transform


def generate_ellipse_path(poses, n_frames=120, const_speed=True, z_variation=0.0, z_phase=0.0):
    """multinerf's elliptical render path around poses normalized by `transform_poses_pca` (z up).

    The ellipse lies in a horizontal plane, centred above or below the cameras' focus point (see
    `focus_point`), with semi-axes the 90th percentile of the cameras' |x| and |y| offsets from it;
    its height is z = 0 (the cameras' mean height after `transform_poses_pca`), or, with
    `z_variation` > 0, swings between the 10th and 90th percentiles of the cameras' heights times
    `z_variation` (phase `z_phase` in turns). Every frame looks at the focus point, with up the world
    axis nearest the cameras' mean up vector. With `const_speed`, the angles are re-spaced so that
    consecutive frames are (nearly) equally far apart.

    Returns:
      `[n_frames, 3, 4]` cam2world poses (OpenGL axes).
    """
    poses = poses.double()
    centre = focus_point(poses)
    offset = torch.stack([centre[0], centre[1], torch.zeros_like(centre[0])])
    positions = poses[:, :, 3]
    semi = torch.quantile((positions - offset).abs(), 0.9, dim=0)
    low, high = offset - semi, offset + semi
    z_low, z_high = torch.quantile(positions[:, 2], 0.1), torch.quantile(positions[:, 2], 0.9)

    def points(theta):
        return torch.stack(
            [
                low[0] + (high - low)[0] * (torch.cos(theta) * 0.5 + 0.5),
                low[1] + (high - low)[1] * (torch.sin(theta) * 0.5 + 0.5),
                z_variation * (z_low + (z_high - z_low) * (torch.cos(theta + 2 * math.pi * z_phase) * 0.5 + 0.5)),
            ],
            -1,
        )

    theta = torch.linspace(0.0, 2 * math.pi, n_frames + 1, dtype=torch.float64)
    path = points(theta)
    if const_speed:  # invert the arc length: theta at equally spaced fractions of the way round
        lengths = torch.linalg.norm(path[1:] - path[:-1], dim=-1)
        cdf = torch.cat([torch.zeros(1, dtype=lengths.dtype), torch.cumsum(lengths, 0)])
        if cdf[-1] > 0:
            cdf = cdf / cdf[-1]
            u = torch.linspace(0.0, 1.0, n_frames + 1, dtype=torch.float64)
            i = torch.searchsorted(cdf, u, right=True).clamp(1, n_frames)
            frac = ((u - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp_min(1e-300)).clamp(0, 1)
            theta = theta[i - 1] + frac * (theta[i] - theta[i - 1])
            path = points(theta)
    path = path[:-1]  # the last point repeats the first
    avg_up = poses[:, :, 1].mean(0)
    axis = int(avg_up.abs().argmax())
    up = torch.zeros(3, dtype=torch.float64)
    up[axis] = torch.sign(avg_up[axis])
    return viewmatrix(path - centre, up.expand_as(path), path).float()


# ----------------------------------------------------------------------------
# Comparing two reconstructions of the same cameras.


def umeyama(src, dst):
    """The similarity transform that best maps points `src` onto `dst` (both `[N, 3]`, N >= 3, not all on one
    line), in least squares: Umeyama (1991), "Least-squares estimation of transformation parameters between two
    point patterns".

    Minimizes sum_i |dst_i - (s R src_i + t)|^2 over a scale s > 0, a rotation R (det +1, never a reflection)
    and a translation t. Returns (s, R `[3, 3]`, t `[3]`), float64.
    """
    src, dst = torch.as_tensor(src).double(), torch.as_tensor(dst).double()
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    a, b = src - mean_src, dst - mean_dst
    u, sigma, vh = torch.linalg.svd(b.T @ a / len(src))  # the cross-covariance
    d = torch.ones(3, dtype=src.dtype)
    if torch.linalg.det(u) * torch.linalg.det(vh) < 0:  # the best orthogonal map is a reflection: flip the weakest axis
        d[2] = -1
    rot = u @ torch.diag(d) @ vh
    scale = (sigma * d).sum() / a.square().sum(-1).mean()
    return scale, rot, mean_dst - scale * rot @ mean_src


def align_poses(poses, ref):
    """Camera-to-world poses `poses` `[N, 3, 4]` mapped into the world of `ref` `[N, 3, 4]` (the same cameras,
    found by another reconstruction) by the similarity that best aligns their centres (`umeyama`).

    Returns (aligned poses `[N, 3, 4]`, rotation errors `[N]` in degrees (the angle of each aligned camera's
    rotation relative to its reference), centre errors `[N]` (distances, in `ref`'s units)), float64.
    """
    poses, ref = torch.as_tensor(poses).double(), torch.as_tensor(ref).double()
    scale, rot, t = umeyama(poses[:, :, 3], ref[:, :, 3])
    aligned = torch.cat([rot @ poses[:, :, :3], (scale * poses[:, :, 3] @ rot.T + t)[:, :, None]], -1)
    return (
        aligned,
        rotation_angle(ref[:, :, :3].transpose(1, 2) @ aligned[:, :, :3]),
        (aligned[:, :, 3] - ref[:, :, 3]).norm(dim=-1),
    )


def rotation_angle(rot):
    """The angle in degrees `[...]` of rotations `[..., 3, 3]`: atan2(sin, cos), exact also near 0 (where
    arccos((trace - 1) / 2) loses half the digits)."""
    cos = (rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    axis = torch.stack(
        [rot[..., 2, 1] - rot[..., 1, 2], rot[..., 0, 2] - rot[..., 2, 0], rot[..., 1, 0] - rot[..., 0, 1]], -1
    )
    return torch.rad2deg(torch.atan2(axis.norm(dim=-1) / 2, cos))
