"""Pose your own capture (a folder of photos or a video) with COLMAP, ready to train.

    python scripts/process_capture.py INPUT                   # writes data/captures/NAME (INPUT's name)
    python train.py --config configs/360.txt --dataset_name capture --scene NAME
    python visualize.py --log_dir log/NAME

INPUT is a folder of images (JPEG or PNG, all of one size: one camera) or a video file (its
`--num_frames` sharpest frames, one from each stretch of the video, are kept). COLMAP's own Python
bindings (pycolmap, `pip install -r requirements-capture.txt`; CPU only) then find SIFT features,
match them (every pair of photos; each video frame with its neighbours in time), and reconstruct the
cameras (incremental mapping, one shared camera, its focal length and lens distortion recovered).

The registered images are undistorted (bilinear) into a pinhole camera of the recovered focal length
(one, square pixels, with the default RADIAL model and always for LLFF), its principal point at the
image centre, its size a multiple of 8 cropped to what the lens saw (no invented border), and written
to `images/`, with area-averaged `images_2/`, `images_4/`, `images_8/`. `--format transforms` (the
default) adds `transforms.json` (instant-ngp / nerfstudio: `fl_x fl_y cx cy w h`, camera-to-world
`transform_matrix` in OpenGL axes, COLMAP's world), read by `--dataset_name capture` (which reads
`images/` and averages it down by `--factor`); `--format llff` adds `poses_bounds.npy` (LLFF's layout,
each image's near and far depth the 0.1 and 99.9 percentiles of the depths of the points it sees),
read by `--dataset_name 360` (`images_4/`) or `llff`. The output folder appears only when complete.

pycolmap is optional: nothing else in the project imports it.
"""

import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cv2
import numpy as np

import cli

PROG = 'process_capture.py'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
FACTORS = (2, 4, 8)  # images_2/, images_4/, images_8/
EXHAUSTIVE_MAX = 100  # --matching auto matches every pair of photos up to this many, else neighbours in name order
CAMERA_MODELS = ('RADIAL', 'SIMPLE_RADIAL', 'OPENCV', 'PINHOLE', 'SIMPLE_PINHOLE')
BOUNDS_PERCENTILES = (0.1, 99.9)  # LLFF's imgs2poses
JPEG_QUALITY = 95
NUM_FRAMES = 100  # --num_frames' default


class CaptureError(ValueError):
    """The capture cannot be processed; the message names the input and the fix."""


def build_parser():
    p = cli.Parser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('input', metavar='INPUT', help='a folder of images (JPEG/PNG) or a video file')
    p.add_argument('--out', default=None, help='output folder (default: data/captures/<INPUT name>)')
    p.add_argument(
        '--format',
        choices=('transforms', 'llff'),
        default='transforms',
        help='transforms.json (--dataset_name capture) or poses_bounds.npy (--dataset_name 360 or llff)',
    )
    p.add_argument(
        '--num_frames',
        type=cli.positive_int,
        metavar='N',
        default=None,
        help=f'video: keep N frames, the sharpest of each of N equal stretches of it (default {NUM_FRAMES})',
    )
    p.add_argument(
        '--matching',
        choices=('auto', 'exhaustive', 'sequential'),
        default='auto',
        help=f'which image pairs to match: auto is every pair for up to {EXHAUSTIVE_MAX} photos, '
        'else each image with its 10 neighbours in name (time) order, as for video frames',
    )
    p.add_argument(
        '--camera_model',
        choices=CAMERA_MODELS,
        default='RADIAL',
        help="COLMAP's model of the shared camera: RADIAL is one focal length (square pixels) and two radial "
        'distortion terms; OPENCV adds a second focal length and tangential terms',
    )
    return p


# ----------------------------------------------------------------------------
# The input: images or video frames.


def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_raw(path):
    """An image file as 8-bit BGR `[H, W, 3]` in its stored pixel order (EXIF orientation ignored, as COLMAP
    does: every photo keeps the sensor's shape, so one camera fits them all), or None if unreadable."""
    return cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


def check_images(folder):
    """The readable images of `folder` (sorted names); unreadable ones are skipped
    with a note; a CaptureError when there is none or their sizes differ."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        names = sorted(f for f in os.listdir(folder) if is_image(f) and os.path.isfile(os.path.join(folder, f)))
    except OSError as e:
        raise CaptureError(f'INPUT {folder} cannot be read ({e.strerror or e}): check its permissions') from None
    if not names:
        raise CaptureError(f'INPUT {folder} holds no image (JPEG or PNG): pass a folder of photos or a video file')

    def size(name):
        img = read_raw(os.path.join(folder, name))
        return None if img is None else (img.shape[1], img.shape[0])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        sizes = list(pool.map(size, names))
    bad = [n for n, s in zip(names, sizes) if s is None]
    if bad:
        print(f'skipping {len(bad)} unreadable image(s) in {folder}: {", ".join(bad[:5])}{", ..." * (len(bad) > 5)}')
    good = [(n, s) for n, s in zip(names, sizes) if s is not None]
    if not good:
        raise CaptureError(
            f'INPUT {folder} holds no readable image ({len(names)} file(s) named as images, none decodes): '
            'pass a folder of JPEG or PNG photos'
        )
    first_name, first = good[0]
    for name, s in good:
        if s != first:
            raise CaptureError(
                f'image {os.path.join(folder, name)} is {s[0]}x{s[1]}, but {first_name} is {first[0]}x{first[1]}: '
                'all images must come from one camera at one size (resize or remove the odd ones)'
            )
    return [n for n, _ in good]


def sharpness(bgr):
    """The variance of the Laplacian of the grey image (instant-ngp's colmap2nerf): higher is sharper."""
    return float(cv2.Laplacian(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def count_frames(video):
    """The number of frames of `video` (ffmpeg decodes it once), or a CaptureError naming the fix."""
    import imageio_ffmpeg

    try:
        total, _ = imageio_ffmpeg.count_frames_and_secs(video)
    except (RuntimeError, OSError) as e:
        why = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CaptureError(
            f'INPUT {video} is not a readable video ({why[-1][:200] if why else type(e).__name__}): '
            'pass a video file (mp4, mov, ...) or a folder of images'
        ) from None
    if total < 1:
        raise CaptureError(f'INPUT {video} holds no video frame: pass a video file or a folder of images')
    return total


def extract_frames(video, folder, num_frames, total):
    """Write the sharpest frame (`sharpness`) of each of `num_frames` equal stretches of the `total` frames of
    `video` to `folder`, as frame_<index>.png, in the coded orientation (as photos: one camera); returns their
    names, in time order."""
    import imageio_ffmpeg
    from tqdm import tqdm

    num_frames = min(num_frames, total)
    best = {}  # stretch -> (sharpness, frame index, frame)
    reader = imageio_ffmpeg.read_frames(video, pix_fmt='bgr24', input_params=['-noautorotate'])
    try:
        w, h = next(reader)['size']
        bar = tqdm(reader, total=total, desc='frames', unit='frame', dynamic_ncols=True, disable=None)
        for i, raw in enumerate(bar):
            frame = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            k = min(i * num_frames // total, num_frames - 1)
            s = sharpness(frame)
            if k not in best or s > best[k][0]:
                best[k] = (s, i, frame.copy())
    except (RuntimeError, OSError, ValueError, StopIteration) as e:
        raise CaptureError(
            f'INPUT {video}: decoding failed ({" ".join(str(e).split())[-200:]}): pass another video or a folder of '
            'images'
        ) from None
    finally:
        reader.close()
    names = []
    for k in sorted(best):
        name = f'frame_{best[k][1]:05d}.png'
        if not cv2.imwrite(os.path.join(folder, name), best[k][2]):
            raise OSError(f'could not write {os.path.join(folder, name)}')
        names.append(name)
    print(f'kept {len(names)} of {total} frames of {video} (the sharpest of each stretch)')
    return names


# ----------------------------------------------------------------------------
# COLMAP.


def import_pycolmap():
    """pycolmap, or a CaptureError naming the install command."""
    try:
        import pycolmap
    except ImportError:
        raise CaptureError(
            'pycolmap (COLMAP for Python, an optional dependency) is not installed: pip install pycolmap '
            '(or pip install -r requirements-capture.txt)'
        ) from None
    if int(pycolmap.__version__.split('.')[0]) < 4:
        raise CaptureError(
            f'pycolmap {pycolmap.__version__} is older than the 4.x this script uses: '
            'pip install -r requirements-capture.txt'
        )
    return pycolmap


def reconstruct(image_dir, names, work, matching, camera_model):
    """Features, matches and incremental mapping of `names` in `image_dir`, one shared camera; the database
    and models go to `work`. Returns the largest reconstruction (pycolmap.Reconstruction), or None."""
    import pycolmap
    from tqdm import tqdm

    pycolmap.set_random_seed(0)
    database = os.path.join(work, 'database.db')
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = os.cpu_count() or 1
    # DSP-SIFT: descriptors pooled over several scales; more matches that hold. The fern's focal length
    # comes out 0.1-0.6% from LLFF's instead of 1.4-1.8% (and 30% more points), for 20 s more on the fox.
    extraction.sift.domain_size_pooling = True
    t = time.time()
    print(f'features: SIFT in {len(names)} images (CPU)... ', end='', flush=True)
    pycolmap.extract_features(
        database,
        image_dir,
        image_names=names,
        camera_mode=pycolmap.CameraMode.SINGLE,
        reader_options=reader,
        extraction_options=extraction,
        device=pycolmap.Device.cpu,
    )
    print(f'{time.time() - t:.0f} s', flush=True)
    t = time.time()
    if matching == 'exhaustive':
        print(f'matching: all {len(names) * (len(names) - 1) // 2} pairs... ', end='', flush=True)
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    else:
        print('matching: each image with its 10 neighbours in order... ', end='', flush=True)
        pycolmap.match_sequential(database, device=pycolmap.Device.cpu)
    print(f'{time.time() - t:.0f} s', flush=True)
    t = time.time()
    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = 0
    print('mapping: incremental, one shared camera', flush=True)
    bar = tqdm(total=len(names), desc='registered', unit='image', dynamic_ncols=True, disable=None)
    try:
        models = pycolmap.incremental_mapping(
            database,
            image_dir,
            os.path.join(work, 'sparse'),
            options=options,
            initial_image_pair_callback=lambda: bar.update(2),
            next_image_callback=lambda: bar.update(1),
        )
    finally:
        bar.close()
    print(f'mapping: {time.time() - t:.0f} s', flush=True)
    if not models:
        return None
    return max(models.values(), key=lambda r: r.num_reg_images())


def pinhole_camera(camera, square):
    """The pinhole camera the images are undistorted into: (fx, fy, w, h), its principal point the centre
    (w/2, h/2). The focal lengths are the recovered ones (their geometric mean for both with `square`); the
    size is that of the largest centred rectangle inside the image the lens saw, rounded down to a multiple
    of 8 (so that images_2/4/8 divide it exactly), as COLMAP's undistorter keeps no blank pixel."""
    fx, fy = camera.focal_length_x, camera.focal_length_y
    if square:
        fx = fy = math.sqrt(fx * fy)
    w, h = camera.width, camera.height
    t = np.linspace(0.0, 1.0, 201)[:, None]
    edge = {
        'left': np.hstack([0 * t, t * h]),
        'right': np.hstack([0 * t + w, t * h]),
        'top': np.hstack([t * w, 0 * t]),
        'bottom': np.hstack([t * w, 0 * t + h]),
    }
    xy = {k: camera.cam_from_img(v) for k, v in edge.items()}  # normalized coordinates (x right, y down)
    half_w = min(-xy['left'][:, 0].max(), xy['right'][:, 0].min()) * fx
    half_h = min(-xy['top'][:, 1].max(), xy['bottom'][:, 1].min()) * fy
    step = max(FACTORS)
    return fx, fy, int(2 * half_w // step) * step, int(2 * half_h // step) * step


def undistort_maps(camera, fx, fy, w, h):
    """cv2.remap's maps: where each pixel of the pinhole camera (fx, fy, w, h) is in the recovered camera's image."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5  # COLMAP's pixel centres
    rays = np.stack([(x - w / 2) / fx, (y - h / 2) / fy, np.ones_like(x)], -1).reshape(-1, 3)
    src = camera.img_from_cam(rays).reshape(h, w, 2) - 0.5  # OpenCV's pixel centres are integers
    return src[..., 0].astype(np.float32), src[..., 1].astype(np.float32)


def camera_to_world(image):
    """The camera-to-world `[3, 4]` of a registered pycolmap.Image, in OpenGL axes (x right, y up, z back)."""
    c2w = image.cam_from_world().inverse().matrix()  # OpenCV axes: x right, y down, z forward
    return c2w * np.array([1.0, -1.0, -1.0, 1.0])


def depth_bounds(reconstruction, image):
    """(near, far) of an image: percentiles BOUNDS_PERCENTILES of the depths of the 3D points it sees (LLFF)."""
    cam_from_world = image.cam_from_world().matrix()
    xyz = np.array([reconstruction.points3D[p.point3D_id].xyz for p in image.points2D if p.has_point3D()])
    if len(xyz) == 0:
        raise CaptureError(f'image {image.name} sees no 3D point, so it has no depth bounds: use --format transforms')
    depth = xyz @ cam_from_world[2, :3] + cam_from_world[2, 3]
    return np.percentile(depth, BOUNDS_PERCENTILES)


# ----------------------------------------------------------------------------
# The output.


def write_images(image_dir, names, out, maps):
    """Undistort each image (bilinear) and write it to out/images/, with area averages in out/images_N/."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    for folder in ['images'] + [f'images_{f}' for f in FACTORS]:
        os.makedirs(os.path.join(out, folder))

    def one(k):
        img = read_raw(os.path.join(image_dir, names[k]))
        if img is None:
            raise CaptureError(f'image {os.path.join(image_dir, names[k])} became unreadable: check the input')
        img = cv2.remap(img.astype(np.float32), *maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        h, w = img.shape[:2]
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if names[k].lower().endswith(('.jpg', '.jpeg')) else []
        for f in (1, *FACTORS):
            small = img if f == 1 else cv2.resize(img, (w // f, h // f), interpolation=cv2.INTER_AREA)
            path = os.path.join(out, 'images' if f == 1 else f'images_{f}', names[k])
            if not cv2.imwrite(path, np.clip(np.round(small), 0, 255).astype(np.uint8), params):
                raise OSError(f'could not write {path}')

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(
            tqdm(
                pool.map(one, range(len(names))),
                total=len(names),
                desc='undistort',
                unit='image',
                dynamic_ncols=True,
                disable=None,
            )
        )


def write_transforms(path, fx, fy, w, h, names, c2w):
    import json

    frames = [
        {'file_path': f'images/{n}', 'transform_matrix': np.vstack([m, [0, 0, 0, 1]]).tolist()}
        for n, m in zip(names, c2w)
    ]
    meta = {
        'camera_model': 'PINHOLE',
        'fl_x': fx,
        'fl_y': fy,
        'cx': w / 2,
        'cy': h / 2,
        'w': w,
        'h': h,
        'frames': frames,
    }
    with open(path, 'w') as f:
        json.dump(meta, f, indent=1)


def process(args, names, total_frames, tmp):
    """Everything, written into the empty folder `tmp`; `names` are the images of the INPUT folder (None for a
    video of `total_frames` frames). Returns a summary line."""
    import pycolmap

    pycolmap.logging.minloglevel = 1  # COLMAP's warnings and errors, not its progress chatter
    work = os.path.join(tmp, '.colmap')  # the database, video frames and models; removed when done
    os.makedirs(work)
    video = names is None
    if video:
        image_dir = os.path.join(work, 'frames')
        os.makedirs(image_dir)
        names = extract_frames(args.input, image_dir, args.num_frames or NUM_FRAMES, total_frames)
    else:
        image_dir = args.input
    matching = args.matching
    if matching == 'auto':
        matching = 'sequential' if video or len(names) > EXHAUSTIVE_MAX else 'exhaustive'
    try:
        model = reconstruct(image_dir, names, work, matching, args.camera_model)
    except RuntimeError as e:  # pycolmap's C++ exceptions
        raise CaptureError(f'COLMAP failed on {args.input}: {" ".join(str(e).split())[:300]}') from None
    registered = 0 if model is None else model.num_reg_images()
    if registered < max(len(names) / 2, 2):
        fix = (
            'keep more frames (--num_frames) and move slowly (sharp frames that overlap)'
            if video
            else 'take more photos that overlap (each part of the scene seen from several nearby viewpoints)'
            + (', or pass --matching exhaustive' if matching == 'sequential' else '')
        )
        raise CaptureError(
            f'only {registered} of {len(names)} images of {args.input} were registered (at least half are needed): '
            f'{fix}, of a static, textured scene'
        )
    camera = next(iter(model.cameras.values()))
    fx, fy, w, h = pinhole_camera(camera, square=args.format == 'llff')
    images = sorted((model.images[i] for i in model.reg_image_ids()), key=lambda im: im.name)
    kept = [im.name for im in images]
    c2w = np.stack([camera_to_world(im) for im in images])
    write_images(image_dir, kept, tmp, undistort_maps(camera, fx, fy, w, h))
    if args.format == 'llff':
        bounds = np.stack([depth_bounds(model, im) for im in images])
        import datasets

        np.save(os.path.join(tmp, 'poses_bounds.npy'), datasets.to_poses_bounds(c2w, h, w, fx, bounds))
    else:
        write_transforms(os.path.join(tmp, 'transforms.json'), fx, fy, w, h, kept, c2w)
    shutil.rmtree(work)
    return (
        f'registered {registered} of {len(names)} images, mean reprojection error '
        f'{model.compute_mean_reprojection_error():.2f} pixels; {camera.model_name} camera, focal length '
        f'{camera.mean_focal_length():.1f} pixels; undistorted to {w}x{h}'
    )


def main(argv=None):
    """Check the flags and INPUT, then process into --out (atomically: <out>.partial, renamed when complete)."""
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.input):
        cli.fail(PROG, f'INPUT {args.input} does not exist: pass a folder of images or a video file')
    if os.path.isfile(args.input) and is_image(args.input):
        cli.fail(PROG, f'INPUT {args.input} is one image: pass the folder holding the photos, or a video')
    if os.path.isdir(args.input) and args.num_frames is not None:
        cli.fail(PROG, f'--num_frames is for a video, but INPUT {args.input} is a folder of images: leave it out')
    args.out = args.out or os.path.join(
        'data', 'captures', os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0]
    )
    if os.path.lexists(args.out):
        cli.fail(PROG, f'--out {args.out} already exists: remove it or pass another --out')
    start = time.time()
    made, lock = [], None
    try:
        with cli.stop_on_signals(prog=PROG, note='nothing written'):
            try:
                names, total_frames = None, None
                if os.path.isdir(args.input):
                    names = check_images(args.input)
                else:
                    total_frames = count_frames(args.input)
                import_pycolmap()
                made = cli.make_dirs(os.path.dirname(os.path.abspath(args.out)))
                lock = cli.Lock(cli.lock_path(args.out)).acquire()
                with cli.atomic_output(args.out, folder=True) as tmp:
                    summary = process(args, names, total_frames, tmp)
            except cli.Busy as e:
                cli.fail(PROG, f'--out {args.out} is being written by another process ({e}): wait for it')
            except CaptureError as e:
                cli.fail(PROG, e)
            except OSError as e:
                cli.fail(
                    PROG,
                    f'--out {args.out}: writing failed ({e.strerror or e}): pass a writable folder with free space',
                )
    finally:
        if lock is not None:
            lock.release()
        if not os.path.exists(args.out):
            cli.remove_empty_dirs(made)
    print(f'{summary}; wrote {args.out} in {time.time() - start:.0f} s')
    dataset = 'capture' if args.format == 'transforms' else '360'
    print(f'train it: python train.py --config configs/360.txt --dataset_name {dataset} --base_dir {args.out}')


if __name__ == '__main__':
    main()
