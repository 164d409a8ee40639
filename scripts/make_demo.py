"""Write the built-in demo scene (see scenes.py), in the Blender format.

    python scripts/make_demo.py --out data/demo [--size 100]

`train.py --config configs/demo.txt` makes it by itself when it is missing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenes import make_demo_scene

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='data/demo')
    ap.add_argument('--size', type=int, default=100)
    ap.add_argument('--supersample', type=int, default=4)
    args = ap.parse_args()
    make_demo_scene(args.out, args.size, args.supersample)
