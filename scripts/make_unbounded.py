"""Write the generated unbounded scene (see scenes.py) in the mip-NeRF 360 / LLFF layout.

    python scripts/make_unbounded.py --out data/unbounded [--size 96]

images/, images_2/, images_4/ (img_000.png, ...) and poses_bounds.npy.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenes import make_unbounded_scene

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='data/unbounded')
    ap.add_argument('--size', type=int, default=96, help='image width and height (a multiple of 4)')
    ap.add_argument('--n_views', type=int, default=64)
    ap.add_argument('--supersample', type=int, default=4)
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args()
    if args.size < 4 or args.size % 4 or args.n_views < 1 or args.supersample < 1:
        ap.error('--size must be a positive multiple of 4, --n_views and --supersample positive')
    make_unbounded_scene(args.out, args.size, args.n_views, args.supersample, args.seed)
