"""Every dataset trains end to end through its shipped config, on scenes made from the real data."""

import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval as eval_script
import extract_mesh
import scenes
import train
import visualize
from conftest import FERN, TINY_360, TINY_NET, needs_fern


def run(config, base_dir, log_dir, *extra, eval_every=60):
    train.main(
        [
            '--config',
            config,
            '--base_dir',
            base_dir,
            '--log_dir',
            str(log_dir),
            '--device',
            'cpu',
            '--max_steps',
            '60',
            '--batch_size',
            '256',
            '--lr_init',
            '5e-3',
            '--lr_final',
            '1e-3',
            '--lr_delay_steps',
            '5',
            '--log_every',
            '10',
            '--render_every',
            '60',
            '--eval_every',
            str(eval_every),
            *TINY_NET,
            *extra,
        ]
    )
    assert os.path.isfile(os.path.join(log_dir, 'ckpt_0000060.pt'))
    last = None
    if eval_every:
        with open(os.path.join(log_dir, 'eval.jsonl')) as f:
            last = [json.loads(line) for line in f][-1]
        assert last['step'] == 60
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    psnr = [e.value for e in acc.Scalars('train/psnr_avg')]  # mean training PSNR of each 10 steps
    assert len(psnr) == 6 and psnr[-1] > psnr[0] + 1, psnr
    return last


def test_blender_config_on_lego(lego_subset, tmp_path):
    assert run('blender.txt', lego_subset, tmp_path / 'run', '--factor', '8')['views'] == 2


@needs_fern
def test_llff_config_on_fern(tmp_path):
    assert run('llff.txt', FERN, tmp_path / 'run', '--factor', '8')['views'] == 3


def test_multicam_config_on_converted_lego(lego_multicam, tmp_path):
    run('multicam.txt', lego_multicam, tmp_path / 'run', eval_every=0)  # training only; per-scale table: test_outputs


@pytest.fixture(scope='module')
def unbounded_scene(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('unbounded') / 'scene')
    scenes.make_unbounded_scene(path, size=32, n_views=16, supersample=2, verbose=False)
    return path


def test_both_models_train_on_the_generated_unbounded_scene(unbounded_scene, tmp_path):
    """configs/360.txt and mip-NeRF (disparity sampling) both learn on the unbounded scene; the 360
    run then evaluates, renders its ellipse with depth and normals, resumes, and is refused a mesh."""
    runs_360 = tmp_path / '360'
    last = run('360.txt', unbounded_scene, runs_360, '--factor', '0', *TINY_360)
    assert last['views'] == 2
    run('360.txt', unbounded_scene, tmp_path / 'mip', '--factor', '0', '--model', 'mipnerf', '--lindisp', 'true')

    eval_script.main(['--log_dir', str(runs_360), '--device', 'cpu'])
    with open(runs_360 / 'eval_test_0000060' / 'metrics.json') as f:
        assert json.load(f)['mean']['psnr'] == pytest.approx(last['psnr'], abs=0.05)  # deterministic rendering
    visualize.main(
        ['--log_dir', str(runs_360), '--device', 'cpu', '--n_frames', '2', '--visualize_depth', '--visualize_normals']
    )
    for name in ('video.mp4', 'depth.mp4', 'normals.mp4'):
        assert os.path.getsize(runs_360 / name) > 0
    train.main(
        ['--config', '360.txt', '--base_dir', unbounded_scene, '--log_dir', str(runs_360), '--device', 'cpu']
        + ['--factor', '0', '--max_steps', '70', '--batch_size', '256', '--eval_every', '0', '--resume']
        + TINY_NET
        + TINY_360
    )
    assert os.path.isfile(runs_360 / 'ckpt_0000070.pt')
    with pytest.raises(SystemExit) as e:
        extract_mesh.main(['--log_dir', str(runs_360), '--device', 'cpu'])
    assert e.value.code == 2
