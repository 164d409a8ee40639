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

import os

import cli
import config

# ----------------------------------------------------------------------------
# Camera paths for a dataset.


def render_cameras(
    cfg, data, path, n_frames, render_factor, radius=None, elevation=30.0, zoom_near=None, zoom_far=None
):
    """Poses `[F, 3, 4]` and per-frame (pix2cam, h, w, near, far, ndc) for a path.

    Intrinsics are those of the dataset's first (full-size) image divided by
    `render_factor`.
    """
    import torch

    import pose_utils

    h, w = data.sizes[0]
    if render_factor > min(h, w):
        raise ValueError(f'--render_factor {render_factor}: the images are {w}x{h}, so it can be at most {min(h, w)}')
    h, w = h // render_factor, w // render_factor
    focal = data.focal / render_factor
    # The first image's camera at 1/render_factor: pixel p of the small image is pixel r p of the full one.
    pix2cam = data.pix2cam[0] @ torch.diag(torch.tensor([render_factor, render_factor, 1.0]))
    centres = data.all_cam2world[:, :, 3]
    ref_radius = float(centres.norm(dim=-1).mean())
    near, far = float(data.near[0]), float(data.far[0])
    if path == 'spiral':
        if data.bounds is None:
            raise ValueError('--path spiral needs a forward-facing (LLFF) scene; use spherical or zoom')
        poses = pose_utils.spiral_path(data.all_cam2world, data.bounds, n_frames)
        nears = fars = None
    elif path == 'ellipse':
        if data.ndc is not None:
            raise ValueError('--path ellipse needs a 360-degree scene; use --path spiral for LLFF')
        poses = pose_utils.generate_ellipse_path(data.all_cam2world, n_frames)
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
                raise ValueError(
                    f'--zoom_far ({z_far:g}{"" if zoom_far is not None else " = 2 x radius"}) must '
                    f'exceed --zoom_near ({z_near:g}{"" if zoom_near is not None else " = 0.75 x radius"})'
                )
            poses = pose_utils.zoom_path(n_frames, z_near, z_far, elevation)
        # Keep the near/far window where it was relative to the object.
        shift = poses[:, :, 3].norm(dim=-1) - ref_radius
        nears, fars = (near + shift).clamp_min(0.05), far + shift
    ndc = None if data.ndc is None else dict(focal=focal, w=w, h=h)
    frames = []
    for i in range(len(poses)):
        frames.append(
            (pix2cam, h, w, near if nears is None else float(nears[i]), far if fars is None else float(fars[i]), ndc)
        )
    return poses, frames


def frame_rays(c2w, pix2cam, h, w, near, far, ndc):
    import torch

    import datasets

    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    return datasets.make_rays(pix2cam, c2w, x, y, h, w, near, far, 1.0, ndc)


# ----------------------------------------------------------------------------

PROG = 'visualize.py'


def build_parser():
    p = config.run_parser('Render videos of a trained mip-NeRF along a camera path.')
    p.add_argument(
        '--path',
        default=None,
        choices=['spherical', 'spiral', 'zoom', 'ellipse'],
        help='camera path (default: spiral for LLFF, ellipse for unbounded scenes, spherical otherwise)',
    )
    p.add_argument(
        '--n_frames', type=cli.positive_int, default=120, help='frames in each video (the whole path; at least 1)'
    )
    p.add_argument(
        '--fps',
        type=cli.positive_float,
        default=30,
        help='frames per second of the videos (so n_frames / fps seconds long)',
    )
    p.add_argument('--render_factor', type=cli.positive_int, default=1, help='render at 1/N of the dataset resolution')
    cli.add_bool(p, '--visualize_depth', False, 'also write depth.mp4')
    cli.add_bool(p, '--visualize_normals', False, 'also write normals.mp4')
    p.add_argument(
        '--radius',
        type=cli.positive_float,
        default=None,
        help='spherical and zoom paths: orbit radius (default: mean camera distance)',
    )
    p.add_argument(
        '--elevation', type=cli.finite_float, default=30.0, help='spherical and zoom paths: orbit elevation in degrees'
    )
    p.add_argument(
        '--zoom_near', type=cli.positive_float, default=None, help='zoom path: nearest distance (default 0.75 x radius)'
    )
    p.add_argument(
        '--zoom_far',
        type=cli.positive_float,
        default=None,
        help='zoom path: farthest distance, more than --zoom_near (default 2 x radius)',
    )
    p.add_argument('--out_dir', default=None, help='where the videos go (default: --log_dir)')
    p.prog = PROG  # errors name the script also when main() is called from Python
    return p


def fail(message):
    cli.fail(PROG, message)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import ddp
    import runs

    made, lock = [], None
    try:
        with cli.stop_on_signals(prog=PROG, note='partial videos removed, nothing written'):
            try:
                model, cfg, ckpt, device, data = runs.open_run(args, 'test')
                unbounded = cfg.dataset_name in ('360', 'capture')
                path = args.path or ('spiral' if data.ndc is not None else 'ellipse' if unbounded else 'spherical')
                poses, frames = render_cameras(
                    cfg,
                    data,
                    path,
                    args.n_frames,
                    args.render_factor,
                    args.radius,
                    args.elevation,
                    args.zoom_near,
                    args.zoom_far,
                )
            except (FileNotFoundError, ValueError) as e:
                fail(e)
            out_dir = args.out_dir or args.log_dir
            flag = (
                ('--out_dir', 'pick a writable folder')
                if args.out_dir
                else ('--log_dir', 'pass --out_dir with a writable folder')
            )
            try:
                made, lock = runs.prepare_out_dir(device, out_dir, os.path.join(out_dir, 'video.mp4'), *flag)
            except ValueError as e:
                fail(e)
            try:
                write_videos(args, model, path, poses, frames, ckpt['step'], out_dir)
            except OSError as e:  # a full disk, or ffmpeg failing: the first line says which
                fail(f'writing the videos into {out_dir} failed: {str(e).strip().splitlines()[0]}')
    finally:
        if lock is not None:
            lock.release()
        cli.remove_empty_dirs(made)  # a folder made here stays only if it holds a video
        ddp.cleanup()


def render_frame(model, args, c2w, camera):
    """The uint8 frames of one camera: {'video': ..., 'depth': ..., 'normals': ...} as asked."""
    import vis

    pix2cam, h, w, near, far, ndc = camera
    out = model.render_image(frame_rays(c2w, pix2cam, h, w, near, far, ndc), args.chunk, normals=args.visualize_normals)
    rgb, distance, acc = out[:3]
    images = {'video': vis.to_uint8(rgb)}
    if args.visualize_depth:
        images['depth'] = vis.colorize_depth(distance, near, far, acc)
    if args.visualize_normals:
        images['normals'] = vis.to_uint8(vis.normals_to_rgb(out[3], acc))
    return images


def model_device(model):
    return next(model.parameters()).device


def human_time(seconds):
    return f'{seconds:.0f} s' if seconds < 90 else f'{seconds / 60:.1f} min'


def check_video(path, n_frames):
    """OSError unless the video at `path` holds `n_frames` frames (ffmpeg's own errors, a full disk
    among them, end its process without a word to the writer)."""
    import imageio_ffmpeg

    try:
        found = imageio_ffmpeg.count_frames_and_secs(path)[0]
    except (RuntimeError, OSError) as e:
        raise OSError(f'the video is unreadable ({str(e).strip().splitlines()[0][:80]}); is the disk full?') from None
    if found != n_frames:
        raise OSError(f'the video holds {found} of {n_frames} frames; is the disk full?')


def write_videos(args, model, path, poses, frames, step, out_dir):
    """Stream frames into the videos; under torchrun, ranks render frames round-robin for rank 0 to write.

    Each video goes through `cli.atomic_output` (<name>.partial.mp4, renamed
    when all are complete); on any error or signal the partial files are
    removed (those that exist: ffmpeg creates a file only at the first frame).
    """
    import contextlib
    import time

    import imageio.v2 as imageio
    from tqdm import tqdm

    import ddp

    rank, world, main = ddp.rank(), ddp.world_size(), ddp.is_main()
    names = ['video'] + ['depth'] * args.visualize_depth + ['normals'] * args.visualize_normals
    with contextlib.ExitStack() as outputs:
        writers = {}
        if main:
            for n in names:
                tmp = outputs.enter_context(
                    cli.atomic_output(os.path.join(out_dir, f'{n}.mp4'), check=lambda p: check_video(p, len(poses)))
                )
                writers[n] = outputs.enter_context(
                    contextlib.closing(
                        imageio.get_writer(tmp, fps=args.fps, codec='libx264', quality=8, macro_block_size=2)
                    )
                )
        # The bar as a context: an error or signal ends its line before the message that follows.
        with tqdm(total=len(poses), desc=f'{path} path', dynamic_ncols=True, disable=None if main else True) as bar:
            t0 = time.time()
            for first in range(0, len(poses), world):
                k = first + rank
                images = render_frame(model, args, poses[k], frames[k]) if k < len(poses) else None
                for part in ddp.gather(images) or []:  # frames first .. first + world - 1, in order
                    for n in names if part is not None else []:
                        writers[n].append_data(part[n])
                bar.update(min(world, len(poses) - first))
                if first == 0 and main:  # the time up front, from the first frame
                    each = time.time() - t0
                    bar.write(
                        f'{len(poses)} frames of {frames[0][2]}x{frames[0][1]} on {model_device(model)}: '
                        f'about {human_time(each * len(poses) / world)} ({each:.1f} s a frame'
                        + (f' per process, {world} processes' if world > 1 else '')
                        + '); --n_frames and --render_factor make it shorter'
                    )
    if main:
        print(
            f'wrote {", ".join(n + ".mp4" for n in names)} to {out_dir} '
            f'({len(poses)} frames of {frames[0][2]}x{frames[0][1]}, step {step})'
        )


if __name__ == '__main__':
    main()
