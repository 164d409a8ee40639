"""Render a picture of a mesh (for the README and quick checks), with no OpenGL.

    python scripts/render_mesh.py log/lego/mesh.ply --out mesh.png [--size 512] [--azimuth 30] [--elevation 30]

Dense surface samples are projected through a pinhole camera looking at the
mesh's centre and z-buffered; each sample is shaded by its face normal
(two-sided Lambert with an ambient term) times its vertex colour when the
mesh has colours, grey otherwise. White background.
"""

import argparse
import os
import sys

import numpy as np
import trimesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli
import pose_utils


def render(mesh, size=512, azimuth=30.0, elevation=30.0, distance=None, fov_deg=40.0, samples_per_pixel=6, seed=0):
    """An RGB uint8 image `[size, size, 3]` of the mesh."""
    centre = mesh.bounds.mean(0)
    radius = np.linalg.norm(mesh.bounds[1] - mesh.bounds[0]) / 2
    focal = 0.5 * size / np.tan(np.radians(fov_deg) / 2)
    distance = distance or 1.1 * radius / np.sin(np.radians(fov_deg) / 2)
    c2w = pose_utils.spherical_pose(azimuth, elevation, distance, dtype=__import__('torch').float64).numpy()
    c2w[:, 3] += centre
    pts, face_idx = trimesh.sample.sample_surface(mesh, size * size * samples_per_pixel, seed=seed)
    normals = mesh.face_normals[face_idx]
    if mesh.visual.kind == 'vertex':
        colours = mesh.visual.vertex_colors[mesh.faces[face_idx, 0], :3] / 255.0
    else:
        colours = np.full((len(pts), 3), 0.75)
    cam = (pts - c2w[:, 3]) @ c2w[:, :3]  # world -> camera (x right, y up, looking down -z)
    z = -cam[:, 2]
    front = z > 1e-6
    u = np.floor(focal * cam[front, 0] / z[front] + size / 2).astype(int)
    v = np.floor(-focal * cam[front, 1] / z[front] + size / 2).astype(int)
    keep = (u >= 0) & (u < size) & (v >= 0) & (v < size)
    pix = (v * size + u)[keep]
    depth = z[front][keep]
    light = c2w[:, :3] @ np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])  # from behind the camera
    shade = 0.3 + 0.7 * np.abs(normals[front][keep] @ light)
    rgb = colours[front][keep] * shade[:, None]
    order = np.lexsort((depth, pix))  # by pixel, nearest first
    first = np.ones(len(order), bool)
    first[1:] = pix[order][1:] != pix[order][:-1]
    image = np.ones((size * size, 3))
    image[pix[order][first]] = rgb[order][first]
    return (np.clip(image.reshape(size, size, 3), 0, 1) * 255 + 0.5).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('mesh')
    ap.add_argument('--out', required=True)
    ap.add_argument('--size', type=int, default=512)
    ap.add_argument('--azimuth', type=float, default=30.0)
    ap.add_argument('--elevation', type=float, default=30.0)
    args = ap.parse_args()
    import cv2

    mesh = trimesh.load(args.mesh, force='mesh')
    img = render(mesh, args.size, args.azimuth, args.elevation)
    ok, png = cv2.imencode(os.path.splitext(args.out)[1] or '.png', img[..., ::-1])
    try:
        with cli.atomic_output(args.out) as tmp, open(tmp, 'wb') as f:
            f.write(png.tobytes())
    except OSError as e:
        cli.fail('render_mesh.py', f'{args.out}: cannot write it ({e.strerror or e})')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
