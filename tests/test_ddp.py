"""DistributedDataParallel through torchrun, on CPU with gloo and 2 processes."""

import json
import os
import subprocess
import sys

import torch

from conftest import REPO, demo_run_args
from runs import list_checkpoints

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def test_two_process_gradient_equals_the_global_batch_gradient(tmp_path):
    out = tmp_path / 'grads.json'
    res = subprocess.run(
        TORCHRUN + [os.path.join(REPO, 'tests', 'ddp_check.py'), str(out)], capture_output=True, text=True, timeout=150
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result['world_size'] == 2
    assert result['max_rel_error'] < 1e-5, result['errors']


def train_args(scene, log_dir, *extra):
    flags = '--batch_size 128 --lr_delay_steps 5 --log_every 5 --eval_every 10 --render_every 0'.split()
    return demo_run_args(scene, log_dir, *flags, *extra)


def test_two_process_training_saves_once_and_resumes_with_any_count(tiny_demo, tmp_path):
    log = tmp_path / 'run'
    res = subprocess.run(
        TORCHRUN + [os.path.join(REPO, 'train.py')] + train_args(tiny_demo, log, '--max_steps', '10'),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count('parameters, 20 training views') == 1 and 'x 2 processes' in res.stdout  # rank 0 only
    assert [os.path.basename(p) for p in list_checkpoints(str(log))] == ['ckpt_0000010.pt']
    assert len(list(log.glob('events.out.tfevents.*'))) == 1
    assert len((log / 'eval.jsonl').read_text().splitlines()) == 1
    ckpt = torch.load(log / 'ckpt_0000010.pt', weights_only=False)
    assert ckpt['world_size'] == 2 and len(ckpt['rank_states']) == 2
    # The two ranks drew different rays.
    assert not torch.equal(
        ckpt['rank_states'][0]['sampler']['generator'], ckpt['rank_states'][1]['sampler']['generator']
    )
    # 2 processes -> 1 process -> 2 processes.
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, 'train.py')] + train_args(tiny_demo, log, '--max_steps', '20', '--resume'),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert res.returncode == 0 and 'at step 10' in res.stdout, res.stderr[-2000:]
    res = subprocess.run(
        TORCHRUN + [os.path.join(REPO, 'train.py')] + train_args(tiny_demo, log, '--max_steps', '30', '--resume'),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert res.returncode == 0 and 'at step 20' in res.stdout, res.stderr[-2000:]
    assert torch.load(list_checkpoints(str(log))[-1], weights_only=False)['step'] == 30


def test_eval_video_and_mesh_split_across_two_processes_match_one(demo_run, tmp_path):
    import imageio.v2 as imageio
    import numpy as np
    import trimesh

    import eval as eval_script
    import extract_mesh
    import visualize

    mains = {'eval.py': eval_script.main, 'visualize.py': visualize.main, 'extract_mesh.py': extract_mesh.main}

    def both(script, args):
        mains[script](args('one'))  # one process, in this one
        multi = subprocess.run(
            TORCHRUN + [os.path.join(REPO, script), *args('two')], capture_output=True, text=True, timeout=150
        )
        assert multi.returncode == 0, multi.stderr[-1500:]

    both('eval.py', lambda tag: ['--log_dir', demo_run, '--device', 'cpu', '--out_dir', str(tmp_path / f'eval_{tag}')])
    one, two = (json.loads((tmp_path / f'eval_{t}' / 'metrics.json').read_text()) for t in ('one', 'two'))
    assert [r['index'] for r in two['images']] == [0, 1, 2, 3]
    assert [r['psnr'] for r in two['images']] == [r['psnr'] for r in one['images']]
    for i in range(4):
        assert (tmp_path / 'eval_two' / f'color_{i:03d}.png').read_bytes() == (
            tmp_path / 'eval_one' / f'color_{i:03d}.png'
        ).read_bytes()

    both(
        'visualize.py',
        lambda tag: [
            '--log_dir',
            demo_run,
            '--device',
            'cpu',
            '--n_frames',
            '5',
            '--render_factor',
            '2',
            '--visualize_depth',
            '--out_dir',
            str(tmp_path / f'vid_{tag}'),
        ],
    )
    for name in ('video', 'depth'):
        frames = [
            np.stack([f for f in imageio.get_reader(str(tmp_path / f'vid_{t}' / f'{name}.mp4'))])
            for t in ('one', 'two')
        ]
        assert frames[0].shape == frames[1].shape == (5, 32, 32, 3)
        assert np.array_equal(frames[0], frames[1])

    both(
        'extract_mesh.py',
        lambda tag: [
            '--log_dir',
            demo_run,
            '--device',
            'cpu',
            '--grid_size',
            '40',
            '--threshold',
            '3',
            '--chunk',
            '3000',
            '--out',
            str(tmp_path / f'mesh_{tag}.ply'),
        ],
    )
    one, two = (trimesh.load(str(tmp_path / f'mesh_{t}.ply')) for t in ('one', 'two'))
    assert len(one.faces) > 100 and np.array_equal(one.vertices, two.vertices) and np.array_equal(one.faces, two.faces)


def test_benchmark_under_torchrun_prints_one_table_of_global_rays_per_second():
    """Rank 0 alone prints; rays/s is the batch of every process over the step time; --train_only
    (a scaling run) times the step alone."""
    bench = [os.path.join(REPO, 'scripts', 'benchmark.py'), '--quick', '--device', 'cpu', '--variants', 'fp32']
    bench += ['--train_only']
    res = subprocess.run(TORCHRUN + bench + ['--steps', '2'], capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count('device: cpu (DDP, 2 processes') == 1 and res.stdout.count('| fp32 |') == 1
    row = next(line for line in res.stdout.splitlines() if line.startswith('| fp32 |'))
    rays_s, ms = (float(v.replace(',', '')) for v in row.split('|')[2:4])
    assert [v.strip() for v in row.split('|')[4:6]] == ['-', '-']  # no frame, no density grid
    assert abs(rays_s - 2 * 256 / (ms / 1e3)) < 0.01 * rays_s  # 2 processes x 256 rays per step
