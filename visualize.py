"""Render videos of a trained run along a camera path.

    python visualize.py --log_dir log/lego                          # 360-degree orbit
    python visualize.py --log_dir log/fern --path spiral --visualize_depth --visualize_normals
    python visualize.py --log_dir log/lego --path zoom --render_factor 2 --n_frames 60

Writes video.mp4 (and depth.mp4, normals.mp4) into the run folder, H.264
through imageio-ffmpeg. Frames are streamed to disk as they are rendered and
each file is renamed into place only when complete: bad flags, an unwritable
--out_dir, a failure, Ctrl-C or SIGTERM leave no partial file (and no folder
this script made). The camera intrinsics,
near/far bounds and NDC warp come from the run's dataset; the model and its
config from the run's checkpoint.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import threading

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
    if render_factor > min(h, w):
        raise ValueError(f'--render_factor {render_factor}: the images are {w}x{h}, so it can be at most '
                         f'{min(h, w)}')
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
        r = ref_radius if radius is None else radius
        if path == 'spherical':
            poses = pose_utils.spherical_path(n_frames, r, elevation)
        else:
            z_near = 0.75 * r if zoom_near is None else zoom_near
            z_far = 2.0 * r if zoom_far is None else zoom_far
            if z_far <= z_near:
                raise ValueError(f'--zoom_far ({z_far:g}{"" if zoom_far is not None else " = 2 x radius"}) must '
                                 f'exceed --zoom_near ({z_near:g}{"" if zoom_near is not None else " = 0.75 x radius"})')
            poses = pose_utils.zoom_path(n_frames, z_near, z_far, elevation)
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

PROG = 'visualize.py'


def positive_float(v):
    """An argparse type: a finite number > 0."""
    x = float(v)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {v}')
    return x


def finite_float(v):
    x = float(v)
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {v}')
    return x


def build_parser():
    p = config_lib.run_parser('Render videos of a trained mip-NeRF along a camera path.')
    p.add_argument('--path', default=None, choices=['spherical', 'spiral', 'zoom'],
                   help='camera path (default: spiral for LLFF, spherical otherwise)')
    p.add_argument('--n_frames', type=config_lib.positive_int, default=120,
                   help='frames in each video (the whole path; at least 1)')
    p.add_argument('--fps', type=positive_float, default=30,
                   help='frames per second of the videos (so n_frames / fps seconds long)')
    p.add_argument('--render_factor', type=config_lib.positive_int, default=1,
                   help='render at 1/N of the dataset resolution')
    p.add_argument('--visualize_depth', type=config_lib.str2bool, nargs='?', const=True, default=False,
                   metavar='BOOL', help='also write depth.mp4')
    p.add_argument('--visualize_normals', type=config_lib.str2bool, nargs='?', const=True, default=False,
                   metavar='BOOL', help='also write normals.mp4')
    p.add_argument('--radius', type=positive_float, default=None,
                   help='spherical and zoom paths: orbit radius (default: mean camera distance)')
    p.add_argument('--elevation', type=finite_float, default=30.,
                   help='spherical and zoom paths: orbit elevation in degrees')
    p.add_argument('--zoom_near', type=positive_float, default=None,
                   help='zoom path: nearest distance (default 0.75 x radius)')
    p.add_argument('--zoom_far', type=positive_float, default=None,
                   help='zoom path: farthest distance, more than --zoom_near (default 2 x radius)')
    p.add_argument('--out_dir', default=None, help='where the videos go (default: --log_dir)')
    p.prog = PROG    # errors name the script also when main() is called from Python
    return p


def fail(message):
    config_lib.fail(PROG, message)


# ----------------------------------------------------------------------------
# Output folder and files: made early, removed again when nothing was written.

def make_dirs(path):
    """os.makedirs(path, exist_ok=True); returns the folders it made, deepest first (also when it fails)."""
    made, d = [], os.path.abspath(path)
    while not os.path.lexists(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        remove_empty_dirs(made)
        raise
    return made


def remove_empty_dirs(folders):
    """Remove those of `folders` (deepest first) that exist and are empty."""
    for d in folders:
        try:
            if os.path.isdir(d):
                os.rmdir(d)
        except OSError:
            return


def remove_files(paths, prog=PROG):
    """Remove those of `paths` that exist; say so (prefixed by `prog`) when one cannot be."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            sys.stderr.write(f'{prog}: could not remove {path}: {e.strerror}\n')


def prepare_out_dir(out_dir, probe, flag, hint, value=None):
    """Make `out_dir` and check that the file `probe` can be written there; returns the folders made.

    Raises ValueError with a one-line message naming `flag` (and its `value`,
    `out_dir` by default) and ending in `hint` when it cannot be.
    """
    made = []
    try:
        made = make_dirs(out_dir)
        with open(probe, 'wb'):
            pass
        os.remove(probe)
    except OSError as e:
        remove_empty_dirs(made)
        raise ValueError(f'{flag} {value or out_dir}: cannot write there ({e.strerror or e}); {hint}') from None
    return made


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt, so that nothing swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Inside, SIGINT and SIGTERM raise Stopped once; further ones are ignored while cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []

    def handler(signum, frame):
        if not got:
            got.append(signum)
            raise Stopped(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv=None):
    args = build_parser().parse_args(argv)
    made = []
    try:
        with stop_on_signals():
            try:
                model, cfg, ckpt, device, data = open_run(args, 'test')
                path = args.path or ('spiral' if data.ndc is not None else 'spherical')
                poses, frames = render_cameras(cfg, data, path, args.n_frames, args.render_factor, args.radius,
                                               args.elevation, args.zoom_near, args.zoom_far)
            except (FileNotFoundError, ValueError, config_lib.ConfigError) as e:
                fail(e)
            out_dir = args.out_dir or args.log_dir
            problem = None
            if ddp.is_main():
                try:
                    made = prepare_out_dir(out_dir, os.path.join(out_dir, 'video.partial.mp4'),
                                           *(('--out_dir', 'pick a writable folder') if args.out_dir else
                                             ('--log_dir', 'pass --out_dir with a writable folder')))
                except ValueError as e:
                    problem = str(e)
            if ddp.any_rank([problem is not None], device)[0]:     # every rank stops, not only rank 0
                if problem:
                    fail(problem)
                sys.exit(2)
            try:
                write_videos(args, model, path, poses, frames, ckpt['step'], out_dir)
            except OSError as e:     # a full disk, or ffmpeg failing: the first line says which
                fail(f'writing the videos into {out_dir} failed: {str(e).strip().splitlines()[0]}')
    except Stopped as e:
        name = signal.Signals(e.signum).name
        sys.stderr.write(f'{PROG}: stopped by {name}; partial videos removed, nothing written\n')
        sys.exit(128 + e.signum)          # 130 for Ctrl-C, 143 for SIGTERM, as train.py
    finally:
        remove_empty_dirs(made)           # a folder made here stays only if it holds a video
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


def write_videos(args, model, path, poses, frames, step, out_dir):
    """Stream frames into the videos; under torchrun, ranks render frames round-robin for rank 0 to write.

    The videos are written as <name>.partial.mp4 and renamed when all are
    complete; on any error or signal the partial files are removed (those
    that exist: ffmpeg creates a file only at the first frame).
    """
    rank, world, main = ddp.rank(), ddp.world_size(), ddp.is_main()
    names = ['video'] + ['depth'] * args.visualize_depth + ['normals'] * args.visualize_normals
    tmp = {n: os.path.join(out_dir, f'{n}.partial.mp4') for n in names}
    writers = {}
    try:
        if main:
            for n in names:
                writers[n] = imageio.get_writer(tmp[n], fps=args.fps, codec='libx264', quality=8,
                                                macro_block_size=2)
        # The bar as a context: an error or signal ends its line before the message that follows.
        with tqdm(total=len(poses), desc=f'{path} path', dynamic_ncols=True, disable=not main) as bar:
            for first in range(0, len(poses), world):
                k = first + rank
                images = render_frame(model, args, poses[k], frames[k]) if k < len(poses) else None
                for part in ddp.gather(images) or []:       # frames first .. first + world - 1, in order
                    for n in names if part is not None else []:
                        writers[n].append_data(part[n])
                bar.update(min(world, len(poses) - first))
        while writers:                                  # each closed writer leaves the dict
            writers.pop(next(iter(writers))).close()
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:
                pass
        if main:
            remove_files(tmp.values())
        raise
    if not main:
        return
    for n in names:
        os.replace(tmp[n], os.path.join(out_dir, f'{n}.mp4'))
    print(f'wrote {", ".join(n + ".mp4" for n in names)} to {out_dir} '
          f'({len(poses)} frames of {frames[0][2]}x{frames[0][1]}, step {step})')


if __name__ == '__main__':
    main()
