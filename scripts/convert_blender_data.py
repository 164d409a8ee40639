"""Make the multiscale Blender ("Multicam") dataset of the mip-NeRF paper from nerf_synthetic.

    python scripts/convert_blender_data.py --blenderdir data/nerf_synthetic --outdir data/nerf_multiscale
    python scripts/convert_blender_data.py --blenderdir data/nerf_synthetic --outdir data/nerf_multiscale --scene lego

Each image is saved at full, 1/2, 1/4 and 1/8 resolution (each level the mean
of 2x2 blocks of the previous one, on straight RGBA, as the official
converter) as `images_{split}/{i:03d}_d{level}.png`, and `metadata.json`
holds, per split, lists with one entry per saved image: file_path,
cam2world, pix2cam, width, height, focal, lossmult (the pixel area ratio
4^level), near, far and label (the level). Splits without a
transforms_{split}.json are skipped. A scene folder is written under a
temporary name and renamed when complete; existing scenes are left alone.
Unlike the official script, 8-bit values are rounded, not truncated.
"""

import argparse
import json
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli

SPLITS = ('train', 'val', 'test')


def down2(img):
    """Mean of 2x2 blocks: `[H, W, C]` -> `[H/2, W/2, C]`."""
    h, w = img.shape[0] // 2, img.shape[1] // 2
    return img[: 2 * h, : 2 * w].reshape(h, 2, w, 2, -1).mean(axis=(1, 3))


def read_rgba(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise SystemExit(f'convert_blender_data.py: error: cannot read {path}: re-download the scene')
    if img.ndim == 2 or img.shape[-1] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA if img.ndim == 2 else cv2.COLOR_BGR2BGRA)
    return img[..., [2, 1, 0, 3]].astype(np.float64) / 255.0


def convert_split(basedir, newdir, split, n_down):
    with open(os.path.join(basedir, f'transforms_{split}.json')) as f:
        meta = json.load(f)
    imgdir = f'images_{split}'
    os.makedirs(os.path.join(newdir, imgdir), exist_ok=True)
    out = {
        k: []
        for k in ('file_path', 'cam2world', 'pix2cam', 'width', 'height', 'focal', 'lossmult', 'near', 'far', 'label')
    }
    for i, frame in enumerate(meta['frames']):
        img = read_rgba(os.path.join(basedir, frame['file_path'] + '.png'))
        focal = 0.5 * img.shape[1] / np.tan(0.5 * float(meta['camera_angle_x']))
        for level in range(n_down):
            name = f'{imgdir}/{i:03d}_d{level}.png'
            rgba8 = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
            if not cv2.imwrite(os.path.join(newdir, name), rgba8[..., [2, 1, 0, 3]]):
                raise SystemExit(
                    f'convert_blender_data.py: error: cannot write {os.path.join(newdir, name)}: '
                    'free some space or pick a writable --outdir'
                )
            h, w = img.shape[:2]
            f = focal / 2**level
            out['file_path'].append(name)
            out['cam2world'].append(frame['transform_matrix'])
            out['pix2cam'].append([[1 / f, 0, -0.5 * w / f], [0, -1 / f, 0.5 * h / f], [0, 0, -1]])
            out['width'].append(w)
            out['height'].append(h)
            out['focal'].append(f)
            out['lossmult'].append(4.0**level)
            out['near'].append(2.0)
            out['far'].append(6.0)
            out['label'].append(level)
            if level + 1 < n_down:
                img = down2(img)
    return out


def convert_scene(basedir, newdir, n_down=4, verbose=True):
    """Convert one nerf_synthetic scene folder; returns the splits written."""
    if os.path.isfile(os.path.join(newdir, 'metadata.json')):
        if verbose:
            print(f'{newdir} exists: skipped')
        return []
    splits = [s for s in SPLITS if os.path.isfile(os.path.join(basedir, f'transforms_{s}.json'))]
    if not splits:
        raise SystemExit(
            f'convert_blender_data.py: error: {basedir} has no transforms_*.json: is it a nerf_synthetic scene?'
        )
    bigmeta = {}
    with cli.atomic_output(newdir, folder=True) as tmp:  # <newdir>.partial/, renamed when complete
        for split in splits:
            if verbose:
                print(f'{basedir}: {split}')
            bigmeta[split] = convert_split(basedir, tmp, split, n_down)
        with open(os.path.join(tmp, 'metadata.json'), 'w') as f:
            json.dump(bigmeta, f)
    if verbose:
        print(f'wrote {newdir} ({", ".join(splits)}; {n_down} scales)')
    return splits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--blenderdir', required=True, help='nerf_synthetic folder (holding one folder per scene)')
    ap.add_argument('--outdir', required=True, help='output folder (holding one folder per scene)')
    ap.add_argument('--scene', default=None, help='convert only this scene')
    ap.add_argument('--n_down', type=int, default=4, help='number of scales')
    args = ap.parse_args(argv)
    if not os.path.isdir(args.blenderdir):
        sys.exit(f'convert_blender_data.py: error: {args.blenderdir} not found: run scripts/download_blender.sh')
    if args.n_down < 1:
        sys.exit('convert_blender_data.py: error: --n_down must be at least 1')
    scenes = (
        [args.scene]
        if args.scene
        else sorted(d for d in os.listdir(args.blenderdir) if os.path.isdir(os.path.join(args.blenderdir, d)))
    )
    for scene in scenes:
        src = os.path.join(args.blenderdir, scene)
        if not os.path.isdir(src):
            sys.exit(f'convert_blender_data.py: error: scene folder {src} not found')
        os.makedirs(args.outdir, exist_ok=True)
        convert_scene(src, os.path.join(args.outdir, scene), args.n_down)


if __name__ == '__main__':
    main()
