"""Render videos of a trained run along a camera path.

    python visualize.py --log_dir log/lego                          # 360-degree orbit
    python visualize.py --log_dir log/fern --path spiral --visualize_depth --visualize_normals
    python visualize.py --log_dir log/lego --path zoom --render_factor 2 --n_frames 60

Writes video.mp4 (and depth.mp4, normals.mp4) into the run folder, H.264
through imageio-ffmpeg. Frames are streamed to disk as they are rendered and
each file is renamed into place only when complete. The camera intrinsics,
near/far bounds and NDC warp come from the run's dataset; the model and its
config from the run's checkpoint.
"""
import os

import cv2
import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

import config as config_lib
import datasets
import ddp
import pose_utils
import ray_utils
from model import open_run


# ----------------------------------------------------------------------------
# Images.

def to_uint8(img):
    """Float image in [0, 1] (tensor or array) -> uint8 array."""
    if torch.is_tensor(img):
        img = img.detach().float().cpu().numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def colorize_depth(distance, near, far, acc=None):
    """Distance `[H, W]` -> RGB uint8 `[H, W, 3]`, turbo colour map from near to far.

    With the opacity `acc`, the colours are composited over white, so empty
    space (whose expected distance means nothing) shows as background.
    """
    as_np = lambda x: x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    t = np.clip((as_np(distance) - near) / max(far - near, 1e-8), 0, 1)
    bgr = cv2.applyColorMap((t * 255 + 0.5).astype(np.uint8), cv2.COLORMAP_TURBO)
    rgb = bgr[..., ::-1].astype(np.float32) / 255
    if acc is not None:
        a = np.clip(as_np(acc), 0, 1)[..., None]
        rgb = rgb * a + (1 - a)
    return to_uint8(rgb)


def normals_to_rgb(normals, acc):
    """Composited normals `[H, W, 3]` (sum of w n) -> colours (n + 1) / 2 over white."""
    return (normals + acc[..., None]) / 2 + (1 - acc[..., None])


# ----------------------------------------------------------------------------
# Camera paths for a dataset.

def render_cameras(cfg, data, path, n_frames, render_factor, radius=None, elevation=30.,
                   zoom_near=None, zoom_far=None):
    """Poses `[F, 3, 4]` and per-frame (pix2cam, h, w, near, far, ndc) for a path.

    Intrinsics are those of the dataset's first (full-size) image divided by
    `render_factor`.
    """
    h, w = data.sizes[0]
    h, w = h // render_factor, w // render_factor
    focal = data.focal / render_factor
    pix2cam = ray_utils.pinhole_pix2cam(focal, w, h)
    centres = data.all_cam2world[:, :, 3]
    ref_radius = float(centres.norm(dim=-1).mean())
    near, far = float(data.near[0]), float(data.far[0])
    if path == 'spiral':
        if data.bounds is None:
            raise ValueError('--path spiral needs a forward-facing (LLFF) scene; use spherical or zoom')
        poses = pose_utils.spiral_path(data.all_cam2world, data.bounds, n_frames)
        nears = fars = None
    else:
        if data.ndc is not None:
            raise ValueError(f'--path {path} needs a 360-degree scene; use --path spiral for LLFF')
        r = radius or ref_radius
        if path == 'spherical':
            poses = pose_utils.spherical_path(n_frames, r, elevation)
        else:
            poses = pose_utils.zoom_path(n_frames, zoom_near or 0.75 * r, zoom_far or 2.0 * r, elevation)
        # Keep the near/far window where it was relative to the object.
        shift = poses[:, :, 3].norm(dim=-1) - ref_radius
        nears, fars = (near + shift).clamp_min(0.05), far + shift
    ndc = None if data.ndc is None else dict(focal=focal, w=w, h=h)
    frames = []
    for i in range(len(poses)):
        frames.append((pix2cam, h, w, near if nears is None else float(nears[i]),
                       far if fars is None else float(fars[i]), ndc))
    return poses, frames


def frame_rays(c2w, pix2cam, h, w, near, far, ndc):
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    return datasets.make_rays(pix2cam, c2w, x, y, h, w, near, far, 1., ndc)


# ----------------------------------------------------------------------------

def build_parser():
    p = config_lib.run_parser('Render videos of a trained mip-NeRF along a camera path.')
    p.add_argument('--path', default=None, choices=['spherical', 'spiral', 'zoom'],
                   help='camera path (default: spiral for LLFF, spherical otherwise)')
    p.add_argument('--n_frames', type=config_lib.positive_int, default=120)
    p.add_argument('--fps', type=config_lib.positive_int, default=30)
    p.add_argument('--render_factor', type=config_lib.positive_int, default=1,
                   help='render at 1/N of the dataset resolution')
    p.add_argument('--visualize_depth', type=config_lib.str2bool, nargs='?', const=True, default=False,
                   metavar='BOOL', help='also write depth.mp4')
    p.add_argument('--visualize_normals', type=config_lib.str2bool, nargs='?', const=True, default=False,
                   metavar='BOOL', help='also write normals.mp4')
    p.add_argument('--radius', type=float, default=None, help='orbit radius (default: mean camera distance)')
    p.add_argument('--elevation', type=float, default=30., help='orbit elevation in degrees')
    p.add_argument('--zoom_near', type=float, default=None, help='zoom path: nearest distance (default 0.75 x radius)')
    p.add_argument('--zoom_far', type=float, default=None, help='zoom path: farthest distance (default 2 x radius)')
    p.add_argument('--out_dir', default=None, help='where the videos go (default: --log_dir)')
    return p


def fail(message):
    config_lib.fail('visualize.py', message)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        model, cfg, ckpt, device, data = open_run(args, 'test')
        path = args.path or ('spiral' if data.ndc is not None else 'spherical')
        poses, frames = render_cameras(cfg, data, path, args.n_frames, args.render_factor, args.radius,
                                       args.elevation, args.zoom_near, args.zoom_far)
    except (FileNotFoundError, ValueError, config_lib.ConfigError) as e:
        fail(e)
    try:
        write_videos(args, model, path, poses, frames, ckpt['step'])
    finally:
        ddp.cleanup()


def render_frame(model, args, c2w, camera):
    """The uint8 frames of one camera: {'video': ..., 'depth': ..., 'normals': ...} as asked."""
    pix2cam, h, w, near, far, ndc = camera
    out = model.render_image(frame_rays(c2w, pix2cam, h, w, near, far, ndc), args.chunk,
                             normals=args.visualize_normals)
    rgb, distance, acc = out[:3]
    images = {'video': to_uint8(rgb)}
    if args.visualize_depth:
        images['depth'] = colorize_depth(distance, near, far, acc)
    if args.visualize_normals:
        images['normals'] = to_uint8(normals_to_rgb(out[3], acc))
    return images


def write_videos(args, model, path, poses, frames, step):
    """Stream frames into the videos; under torchrun, ranks render frames round-robin for rank 0 to write."""
    rank, world, main = ddp.rank(), ddp.world_size(), ddp.is_main()
    out_dir = args.out_dir or args.log_dir
    names = ['video'] + ['depth'] * args.visualize_depth + ['normals'] * args.visualize_normals
    tmp = {n: os.path.join(out_dir, f'{n}.partial.mp4') for n in names}
    writers = {}
    if main:
        os.makedirs(out_dir, exist_ok=True)
        writers = {n: imageio.get_writer(tmp[n], fps=args.fps, codec='libx264', quality=8, macro_block_size=2)
                   for n in names}
    try:
        for first in tqdm(range(0, len(poses), world), desc=f'{path} path', dynamic_ncols=True, disable=not main):
            k = first + rank
            images = render_frame(model, args, poses[k], frames[k]) if k < len(poses) else None
            for part in ddp.gather(images) or []:       # frames first .. first + world - 1, in order
                for n in names if part is not None else []:
                    writers[n].append_data(part[n])
    except BaseException:
        for n in writers:
            writers[n].close()
            os.remove(tmp[n])
        raise
    if not main:
        return
    for n in names:
        writers[n].close()
        os.replace(tmp[n], os.path.join(out_dir, f'{n}.mp4'))
    print(f'wrote {", ".join(n + ".mp4" for n in names)} to {out_dir} '
          f'({len(poses)} frames of {frames[0][2]}x{frames[0][1]}, step {step})')


if __name__ == '__main__':
    main()
