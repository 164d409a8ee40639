"""Every dataset trains end to end through its shipped config, on scenes made from the real data."""

import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import FERN, TINY_NET, needs_fern


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
