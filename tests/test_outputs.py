"""What users look at: evaluation metrics and images, videos, meshes."""

import json
import math
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

import eval as eval_script
import extract_mesh
import meshing
import visualize
from loss import mse_to_psnr, ssim


def gaussian_window_sum_of_squares(sigma=1.5, size=11):
    x = np.arange(size) - size // 2
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return (w**2).sum() ** 2  # 2-D window = outer product of 1-D ones


def test_metrics_of_an_image_against_itself_and_known_noise():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(64, 64, 3, generator=gen)
    assert ssim(img, img) == pytest.approx(1.0)
    m = eval_script.image_metrics(img, img)
    assert m['psnr'] == math.inf and m['ssim'] == pytest.approx(1.0)
    # Flat grey plus Gaussian noise of std s: MSE = s^2, so PSNR = -10 log10(s^2).
    s = 0.05
    flat = torch.full((256, 256, 3), 0.5)
    noisy = flat + s * torch.randn(256, 256, 3, generator=gen)
    assert float(mse_to_psnr(((noisy - flat) ** 2).mean())) == pytest.approx(-10 * math.log10(s**2), abs=0.05)
    # For a flat reference the luminance term is 1 and SSIM = E[C2 / (v + C2)], C2 = 0.03^2, where v, the
    # Gaussian-weighted local variance of white noise, has mean m = s^2 (1 - sum w^2) and variance about
    # 2 s^4 sum w^2. To second order, E[f(v)] = f(m) + f''(m) Var(v) / 2 with f''(m) = 2 C2 / (m + C2)^3.
    c2, sw2 = 0.03**2, gaussian_window_sum_of_squares()
    m, var_v = s**2 * (1 - sw2), 2 * s**4 * sw2
    expected = c2 / (m + c2) + c2 / (m + c2) ** 3 * var_v
    assert ssim(noisy, flat) == pytest.approx(expected, rel=0.02)


def test_eval_writes_images_metrics_and_table(demo_run, capsys):
    eval_script.main(['--log_dir', demo_run, '--device', 'cpu'])
    out_dir = os.path.join(demo_run, 'eval_test_0000250')
    metrics = json.load(open(os.path.join(out_dir, 'metrics.json')))
    assert metrics['step'] == 250 and len(metrics['images']) == 4
    psnrs = [r['psnr'] for r in metrics['images']]
    assert metrics['mean']['psnr'] == pytest.approx(sum(psnrs) / 4) and metrics['mean']['psnr'] > 17
    assert 0 < metrics['mean']['ssim'] <= 1
    for kind in ('color', 'depth', 'acc'):
        img = imageio.imread(os.path.join(out_dir, f'{kind}_003.png'))
        assert img.shape[:2] == (64, 64)
    # The PNG is the render: recompute PSNR from it against the data.
    import datasets

    data = datasets.get_dataset('demo', os.path.join(os.path.dirname(demo_run), 'scene'), 'test')
    png = torch.from_numpy(imageio.imread(os.path.join(out_dir, 'color_000.png'))).float() / 255
    assert float(mse_to_psnr(((png - data.images[0]) ** 2).mean())) == pytest.approx(psnrs[0], abs=0.2)
    out = capsys.readouterr().out
    assert '| image | PSNR | SSIM |' in out and '| mean |' in out
    assert 'LPIPS' in out or 'lpips_note' in metrics


def test_multiscale_table_layout():
    rows = [
        {'index': i, 'label': i % 4, 'psnr': 30.0 + i % 4, 'ssim': 0.9, 'mse': 10 ** (-(30 + i % 4) / 10)}
        for i in range(8)
    ]
    metrics = {
        'images': rows,
        'mean': eval_script.summarize(rows),
        'per_scale': {str(s): eval_script.summarize([r for r in rows if r['label'] == s]) for s in range(4)},
    }
    table = eval_script.format_table(metrics).splitlines()
    assert table[0] == (
        '| PSNR Full Res. | PSNR 1/2 Res. | PSNR 1/4 Res. | PSNR 1/8 Res. | '
        'SSIM Full Res. | SSIM 1/2 Res. | SSIM 1/4 Res. | SSIM 1/8 Res. |'
    )
    assert table[2].startswith('| 30.00 | 31.00 | 32.00 | 33.00 | 0.900 |')


def test_eval_refuses_a_missing_run(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), '..', 'eval.py'), '--log_dir', str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and 'no checkpoint' in res.stderr and 'Traceback' not in res.stderr


def run_eval(args, capsys):
    """eval.main in this process: (exit code, stderr lines, stdout); a traceback fails the test."""
    try:
        eval_script.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, err.strip().splitlines(), out


def test_eval_never_replaces_a_folder_it_did_not_write(demo_run, tmp_path, capsys):
    import shutil

    run = tmp_path / 'run'
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns('eval_*'))
    before = sorted(os.listdir(run))
    for out in (run, tmp_path):  # the run itself, and a folder holding it
        code, err, _ = run_eval(['--log_dir', str(run), '--device', 'cpu', '--out_dir', str(out)], capsys)
        assert code == 2 and len(err) == 1 and 'holds other files' in err[0] and 'pass a new or empty folder' in err[0]
    assert sorted(os.listdir(run)) == before
    code, err, _ = run_eval(['--log_dir', str(run), '--device', 'cpu', '--out_dir', '/proc/no/such'], capsys)
    assert code == 2 and len(err) == 1 and '--out_dir /proc/no/such: cannot write there' in err[0]
    # An earlier evaluation in the folder is replaced, as a rerun expects.
    out = tmp_path / 'ev'
    for _ in range(2):
        assert run_eval(['--log_dir', str(run), '--device', 'cpu', '--out_dir', str(out)], capsys)[0] == 0
    assert not os.path.exists(str(out) + '.partial')
    assert json.load(open(out / 'metrics.json'))['checkpoint'] == str(run / 'ckpt_0000250.pt')


def test_bad_checkpoints_are_one_line_errors_and_a_folder_falls_back(demo_run, tmp_path, capsys):
    import shutil

    run = tmp_path / 'run'
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns('eval_*'))
    good = (run / 'ckpt_0000250.pt').read_bytes()
    cases = {'truncated': good[:1000], 'empty': b'', 'random': os.urandom(4000)}
    for name, data in cases.items():
        (tmp_path / f'{name}.pt').write_bytes(data)
        code, err, _ = run_eval(['--ckpt', str(tmp_path / f'{name}.pt'), '--device', 'cpu'], capsys)
        assert code == 2 and len(err) == 1 and f'{name}.pt is unreadable' in err[0], err
    torch.save({'step': 3}, tmp_path / 'other.pt')
    code, err, _ = run_eval(['--ckpt', str(tmp_path / 'other.pt'), '--device', 'cpu'], capsys)
    assert code == 2 and len(err) == 1 and 'other.pt is not a checkpoint of train.py (no model_args' in err[0]
    # A run folder whose latest checkpoint is truncated: the one before is used, with a note.
    (run / 'ckpt_0000300.pt').write_bytes(good[:5000])
    code, err, out = run_eval(['--log_dir', str(run), '--device', 'cpu', '--out_dir', str(tmp_path / 'ev')], capsys)
    assert code == 0 and 'ckpt_0000300.pt is unreadable' in out and 'taking the one before' in out
    assert json.load(open(tmp_path / 'ev' / 'metrics.json'))['step'] == 250
    # --ckpt alone: outputs go beside the checkpoint.
    code, _, _ = run_eval(['--ckpt', str(run / 'ckpt_0000250.pt'), '--device', 'cpu'], capsys)
    assert code == 0 and (run / 'eval_test_0000250' / 'metrics.json').exists()
    code, err, _ = run_eval(['--device', 'cpu'], capsys)
    assert code == 2 and len(err) == 1 and 'pass the run with --log_dir' in err[0]


def test_video_has_the_expected_frames(demo_run, tmp_path):
    visualize.main(
        [
            '--log_dir',
            demo_run,
            '--out_dir',
            str(tmp_path),
            '--n_frames',
            '6',
            '--render_factor',
            '2',
            '--visualize_depth',
            '--visualize_normals',
            '--device',
            'cpu',
        ]
    )
    for name in ('video', 'depth', 'normals'):
        path = tmp_path / f'{name}.mp4'
        assert path.is_file() and not (tmp_path / f'{name}.partial.mp4').exists()
        reader = imageio.get_reader(str(path))
        frames = [f for f in reader]
        assert len(frames) == 6 and frames[0].shape == (32, 32, 3)
        assert reader.get_meta_data()['codec'] == 'h264'
    frame = imageio.get_reader(str(tmp_path / 'video.mp4')).get_data(0)
    assert frame[0, 0].min() > 200  # white background in the corner
    assert frame[16, 16].astype(int).sum() < 600  # the object in the middle


def test_normals_of_a_rendered_ball_point_outwards():
    """Composited normals equal the analytic ones for a ball of density."""
    from config import ModelArgs
    from model import MipNeRF
    from ray_utils import Rays

    model = MipNeRF(ModelArgs(num_samples=256), randomized=False).eval()
    centre, radius = torch.tensor([0.0, 0.0, 0.0]), 0.8

    def query(mean, cov, view_enc, randomized=False):
        density = 1000 * torch.sigmoid(200 * (radius - (mean - centre).norm(dim=-1)))
        return torch.full(mean.shape, 0.5), density

    model.query = query
    o = torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, 4.0]])
    d = torch.tensor([[0.1, 0.05, -1.0], [-0.08, 0.03, -1.0]])  # both hit the ball
    ones = torch.ones(2, 1)
    rays = Rays(o, d, d / d.norm(dim=-1, keepdim=True), ones * 1e-3, ones, ones * 2, ones * 6)
    rgb, dist, acc, normals = model(rays, normals=True)[-1]
    # Hit point of each ray on the sphere, and its outward normal.
    dn = d / d.norm(dim=-1, keepdim=True)
    b = (o * dn).sum(-1)
    t_hit = -b - torch.sqrt(b**2 - (o.norm(dim=-1) ** 2 - radius**2))
    n_true = (o + t_hit[:, None] * dn) / radius
    torch.testing.assert_close(normals / normals.norm(dim=-1, keepdim=True), n_true, atol=0.02, rtol=0)


def test_mesh_of_an_analytic_ball():
    lo, hi, n, radius = np.full(3, -1.0), np.full(3, 1.0), 64, 0.7
    grid = meshing.density_grid(lambda p: 100 * (radius - p.norm(dim=-1)), lo, hi, n, progress=False)
    vertices, faces = meshing.grid_to_mesh(grid, lo, hi, 0.0)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    voxel = 2 / (n - 1)
    assert np.abs(np.linalg.norm(vertices, axis=1) - radius).max() < voxel
    assert mesh.is_watertight and mesh.volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.01)
    # Off-centre box: vertices map to world coordinates, not grid indices or densities.
    lo2, hi2 = np.array([0.0, -1.0, -2.0]), np.array([2.0, 1.0, 0.0])
    grid = meshing.density_grid(
        lambda p: 100 * (0.5 - (p - torch.tensor([1.0, 0.0, -1.0])).norm(dim=-1)), lo2, hi2, n, progress=False
    )
    vertices, _ = meshing.grid_to_mesh(grid, lo2, hi2, 0.0)
    assert np.abs(np.linalg.norm(vertices - [1, 0, -1], axis=1) - 0.5).max() < voxel


def test_small_pieces_are_removed():
    big = trimesh.creation.icosphere(subdivisions=3)
    small = trimesh.creation.icosphere(subdivisions=0, radius=0.1)  # 20 faces: 1.6% of 1280
    small.apply_translation([3, 0, 0])
    both = trimesh.util.concatenate([big, small])
    cleaned = meshing.remove_small_components(both, 0.05)
    assert len(cleaned.faces) == len(big.faces)


def test_mesh_of_the_trained_demo_is_close_to_the_true_surface(demo_run, tmp_path):
    """Chamfer distance between the demo mesh and the demo object's true surface.

    Bound: the scene is 64 px wide with focal 89 px at distance 4, so a pixel covers about 0.045 units
    on the object; after 250 short steps we ask for the mean two-way distance to be under 2.5 pixel
    footprints plus half a voxel of the 64^3 grid (0.024): 0.136. The surface is the density-3 level
    set (the inside has reached about 10 by then). Only the region above the pedestal's bottom
    (z > -0.6) counts: no camera sees below it, so the density there is unconstrained.
    """
    from scenes import surface_points

    out = tmp_path / 'demo.ply'
    extract_mesh.main(
        [
            '--log_dir',
            demo_run,
            '--grid_size',
            '64',
            '--threshold',
            '3',
            '--colors',
            '--out',
            str(out),
            '--device',
            'cpu',
        ]
    )
    mesh = trimesh.load(str(out))
    assert len(mesh.faces) > 1000 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    pts = torch.tensor(mesh.sample(20000), dtype=torch.float32)
    pts = pts[pts[:, 2] > -0.6]
    truth = torch.tensor(surface_points(20000), dtype=torch.float32)
    d_mesh = torch.cdist(pts, truth).min(1).values.mean()
    d_truth = torch.cdist(truth, pts).min(1).values.mean()
    chamfer = 0.5 * (d_mesh + d_truth)
    assert chamfer < 2.5 * 0.045 + 0.5 * 3 / 63, (d_mesh, d_truth)
    # Colours: the pedestal's sides are green, the ball red and yellow.
    side = mesh.vertices[:, 0] > 0.78
    assert mesh.visual.vertex_colors[side, 1].mean() > mesh.visual.vertex_colors[side, 0].mean()


def test_mesh_refuses_a_threshold_without_surface(demo_run, tmp_path):
    with pytest.raises(SystemExit) as e:
        extract_mesh.main(
            [
                '--log_dir',
                demo_run,
                '--grid_size',
                '16',
                '--threshold',
                '1e6',
                '--out',
                str(tmp_path / 'm.ply'),
                '--device',
                'cpu',
            ]
        )
    assert e.value.code == 2 and not (tmp_path / 'm.ply').exists()


def test_scripts_render_at_the_runs_precision_unless_told(demo_run):
    import config as config_lib
    from runs import open_run

    parser = config_lib.run_parser('test', data=False)
    model, cfg, *_ = open_run(parser.parse_args(['--log_dir', demo_run, '--device', 'cpu']))
    assert cfg.precision == 'fp32' and not model.bf16
    model, *_ = open_run(parser.parse_args(['--log_dir', demo_run, '--device', 'cpu', '--precision', 'bf16']))
    assert model.bf16


def test_mesh_with_default_flags_takes_its_level_from_the_run_or_the_density_field(demo_run, tmp_path, capsys):
    """No --threshold: the run's --mesh_threshold if it set one, else a level chosen from the density field."""
    extract_mesh.main(['--log_dir', demo_run, '--device', 'cpu', '--grid_size', '32', '--out', str(tmp_path / 'a.ply')])
    out = capsys.readouterr().out
    assert 'chosen from the density field' in out and len(trimesh.load(str(tmp_path / 'a.ply')).faces) > 100
    run = tmp_path / 'run'
    run.mkdir()
    ckpt = torch.load(os.path.join(demo_run, 'ckpt_0000250.pt'), weights_only=False)
    assert ckpt['config']['mesh_threshold'] is None
    ckpt['config']['mesh_threshold'] = 2.5
    torch.save(ckpt, run / 'ckpt_0000250.pt')
    extract_mesh.main(['--log_dir', str(run), '--device', 'cpu', '--grid_size', '32'])
    assert "surface at density 2.5 (the run's --mesh_threshold)" in capsys.readouterr().out
