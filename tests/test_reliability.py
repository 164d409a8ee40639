"""Bad input is refused clearly; crashes, signals, NaNs and full disks lose nothing."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import FERN, REPO, demo_run_args, needs_cuda, needs_fern
from runs import list_checkpoints

PY = [sys.executable, os.path.join(REPO, 'train.py')]


def tiny_args(scene, log_dir, *extra, dataset='demo'):
    flags = '--batch_size 128 --lr_delay_steps 10 --log_every 10 --eval_every 0 --render_every 0'.split()
    return demo_run_args(scene, log_dir, *flags, *extra, dataset=dataset)


@pytest.fixture
def refuse(capsys):
    """Check that train.py exits with status 2 and one line naming the problem, writing nothing.

    Runs in this process: any exception other than SystemExit (a traceback) fails the test.
    """

    def check(args, needle, log_dir):
        with pytest.raises(SystemExit) as e:
            train.main(args)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert e.value.code == 2, err
        assert len(lines) == 1 and needle in lines[0], err
        assert not os.path.exists(log_dir), 'nothing may be written'
        return lines[0]

    return check


# ----------------------------------------------------------------------------
# 1. Bad input.


def test_missing_image(scene, tmp_path, refuse):
    os.remove(scene / 'train' / 'r_3.png')
    line = refuse(tiny_args(scene, tmp_path / 'run'), 'r_3.png is missing', tmp_path / 'run')
    assert 're-download or regenerate' in line


def test_truncated_and_non_image_files(scene, tmp_path, refuse):
    data = (scene / 'train' / 'r_3.png').read_bytes()
    (scene / 'train' / 'r_3.png').write_bytes(data[: len(data) // 2])
    refuse(tiny_args(scene, tmp_path / 'run'), 'r_3.png is unreadable (truncated or not an image)', tmp_path / 'run')
    (scene / 'train' / 'r_3.png').write_text('this is not a PNG')
    refuse(tiny_args(scene, tmp_path / 'run'), 'r_3.png is unreadable', tmp_path / 'run')


def test_images_of_mismatched_sizes(scene, tmp_path, refuse):
    import cv2

    cv2.imwrite(str(scene / 'test' / 'r_1.png'), np.zeros((16, 16, 4), np.uint8))
    refuse(tiny_args(scene, tmp_path / 'run'), 'r_1.png has size (16, 16), but', tmp_path / 'run')


@pytest.mark.parametrize(
    'text,needle',
    [
        ('{"camera_angle_x": 0.69, "frames": [', 'transforms_train.json is not valid JSON'),
        ('{"frames": []}', 'transforms_train.json is malformed'),
        (
            '{"camera_angle_x": 0.69, "frames": [{"file_path": "./train/r_0", "transform_matrix": [[1, 0], [0, 1]]}]}',
            'transforms_train.json is malformed',
        ),
    ],
)
def test_malformed_transforms(scene, tmp_path, text, needle, refuse):
    (scene / 'transforms_train.json').write_text(text)
    refuse(tiny_args(scene, tmp_path / 'run'), needle, tmp_path / 'run')


def test_malformed_metadata(tmp_path, refuse):
    scene = tmp_path / 'multi'
    scene.mkdir()
    (scene / 'metadata.json').write_text(json.dumps({'train': {'file_path': ['a.png'], 'cam2world': [1]}}))
    refuse(
        tiny_args(scene, tmp_path / 'run', dataset='multicam'),
        "metadata.json is malformed: split 'train' lacks",
        tmp_path / 'run',
    )
    (scene / 'metadata.json').write_text('[1, 2')
    refuse(tiny_args(scene, tmp_path / 'run', dataset='multicam'), 'metadata.json is not valid JSON', tmp_path / 'run')


@needs_fern
def test_poses_bounds_of_the_wrong_shape(tmp_path, refuse):
    scene = tmp_path / 'fern'
    (scene / 'images_8').mkdir(parents=True)
    for f in sorted(os.listdir(os.path.join(FERN, 'images_8')))[:3]:
        shutil.copy(os.path.join(FERN, 'images_8', f), scene / 'images_8' / f)
    np.save(scene / 'poses_bounds.npy', np.zeros((3, 16)))
    refuse(
        tiny_args(scene, tmp_path / 'run', '--factor', '8', dataset='llff'),
        'poses_bounds.npy has shape (3, 16), expected [N, 17]',
        tmp_path / 'run',
    )


def test_unknown_dataset_and_scene(tmp_path, refuse):
    refuse(
        ['--dataset_name', 'nerf_studio', '--log_dir', str(tmp_path / 'run')],
        "invalid choice: 'nerf_studio'",
        tmp_path / 'run',
    )
    refuse(
        ['--data_dir', str(tmp_path), '--scene', 'legoo', '--log_dir', str(tmp_path / 'run')],
        'scene folder',
        tmp_path / 'run',
    )


def test_unreadable_checkpoint(scene, tmp_path, refuse):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    refuse(tiny_args(scene, tmp_path / 'run', '--resume', str(bad)), 'bad.pt is unreadable', tmp_path / 'run')


@pytest.mark.parametrize(
    'flags,needle',
    [
        (['--batch_size', '0'], '--batch_size must be positive'),
        (['--num_samples', '-4'], '--num_samples must be positive'),
        (['--chunk', '0'], '--chunk must be positive'),
        (['--min_deg_point', '8', '--max_deg_point', '4'], 'must not exceed --max_deg_point'),
        (['--near', '6', '--far', '6'], 'must be less than --far'),
        (['--max_nonfinite', '0'], '--max_nonfinite must be positive'),
        (['--lr_init', 'nan'], '--lr_init must be positive, got nan'),
        (['--lr_delay_mult', '-1'], '--lr_delay_mult must be positive'),
        (['--far', 'inf'], '--far must be a finite number'),
        (['--far', '1e9'], '--far 1e+09: samples that far overflow float32'),
        (['--factor', '1000'], '--factor 1000 is larger than the 32x32 images'),
    ],
)
def test_invalid_numeric_flags(scene, tmp_path, flags, needle, refuse):
    refuse(tiny_args(scene, tmp_path / 'run', *flags), needle, tmp_path / 'run')


def test_scene_typo_lists_the_scenes_and_a_wrong_format_is_named(tmp_path, refuse):
    for name in ('lego', 'ship'):
        (tmp_path / 'nerf_synthetic' / name).mkdir(parents=True)
    line = refuse(
        ['--data_dir', str(tmp_path), '--scene', 'leggo', '--log_dir', str(tmp_path / 'run')],
        'has: lego, ship (pass one of them with --scene)',
        tmp_path / 'run',
    )
    assert 'download' not in line
    refuse(
        [
            '--base_dir',
            str(tmp_path / 'nerf_synthetic' / 'lego'),
            '--log_dir',
            str(tmp_path / 'run'),
            '--device',
            'cpu',
        ],
        'is not a Blender scene (no transforms_*.json)',
        tmp_path / 'run',
    )


def test_log_dir_that_is_a_file_or_unwritable(scene, tmp_path, refuse):
    afile = tmp_path / 'afile'
    afile.write_text('x')
    refuse(tiny_args(scene, afile), f'--log_dir {afile} is a file', tmp_path / 'nothing')
    refuse(tiny_args(scene, '/proc/no/such/run'), '--log_dir /proc/no/such/run: cannot create it', '/proc/no/such/run')


def test_a_new_run_refuses_a_folder_holding_another_run(scene, tmp_path, capsys):
    """Without --resume, a run in a folder with checkpoints would prune them and mix two logs."""
    log = tmp_path / 'run'
    train.main(tiny_args(scene, log, '--max_steps', '6', '--save_every', '3'))
    before = sorted(os.listdir(log))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(scene, log, '--max_steps', '4'))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert 'already holds a run (latest ckpt_0000006.pt): add --resume' in err[0]
    assert sorted(os.listdir(log)) == before
    # Resuming at or past --max_steps trains nothing and writes nothing.
    train.main(tiny_args(scene, log, '--max_steps', '6', '--resume'))
    assert 'is at step 6 and --max_steps is 6: nothing to train' in capsys.readouterr().out
    assert sorted(os.listdir(log)) == before


# ----------------------------------------------------------------------------
# 2. SIGKILL at random moments.


def start_endless_run(scene, log_dir, stdout=subprocess.PIPE):
    """A tiny training run in the background that goes on until stopped, saving every 5 steps."""
    return subprocess.Popen(
        PY + tiny_args(scene, log_dir, '--max_steps', '1000000', '--save_every', '5'),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(log_dir, proc, timeout=60):
    t = time.time()
    while not list_checkpoints(str(log_dir)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.05)


def kill_chain(scene, log, trials, seed):
    """Start, SIGKILL at a random moment, check, resume: `trials` times. Returns the last step saved."""
    args = tiny_args(
        scene, log, '--max_steps', '1000000', '--save_every', '1', '--keep_checkpoints', '2', '--log_every', '1000'
    )
    rng = random.Random(seed)
    last_step = -1
    for trial in range(trials):
        proc = subprocess.Popen(
            PY + args + (['--resume'] if trial else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if trial % 4 == 3:
            time.sleep(rng.uniform(0.0, 1.5))  # during start-up or loading
        else:  # once it trains and saves again: often mid-save
            t = time.time()
            while proc.poll() is None and time.time() - t < 60:
                found = list_checkpoints(str(log))
                if found and int(os.path.basename(found[-1])[5:12]) > last_step:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = list_checkpoints(str(log))
        assert found, f'trial {trial}: no checkpoint left'
        ckpt = torch.load(found[-1], weights_only=False)
        assert ckpt['step'] >= last_step and all(torch.isfinite(v).all() for v in ckpt['model'].values())
        last_step = ckpt['step']
    return last_step


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(scene, tmp_path):
    """20 kills in all: two runs of 10 side by side (one per core)."""
    from concurrent.futures import ThreadPoolExecutor

    logs = [tmp_path / 'run_a', tmp_path / 'run_b']
    with ThreadPoolExecutor(2) as pool:
        last_steps = list(pool.map(lambda i: kill_chain(scene, logs[i], 10, seed=i), range(2)))
    assert min(last_steps) > 0
    log, last_step = logs[0], last_steps[0]
    res = subprocess.run(
        PY
        + tiny_args(
            scene, log, '--max_steps', str(last_step + 5), '--save_every', '1', '--keep_checkpoints', '2', '--resume'
        ),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert f'resumed from {log}/ckpt_{last_step:07d}.pt at step {last_step}' in res.stdout
    assert torch.load(list_checkpoints(str(log))[-1], weights_only=False)['step'] == last_step + 5


# ----------------------------------------------------------------------------
# 3. Exact resume.


def scalars(
    log_dir,
    tags=(
        'train/loss',
        'train/psnr_coarse',
        'train/psnr_fine',
        'train/psnr_avg',
        'train/lr',
        'train/grad_norm',
        'test/psnr',
    ),
):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}


def run_split_and_straight(scene, tmp_path, device, n=20):
    common = ('--max_steps', str(2 * n), '--save_every', str(n), '--eval_every', str(n), '--device', device)
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    train.main(tiny_args(scene, straight, *common))
    # The same run stopped after n steps: train n steps of the 2n-step schedule, remove the last checkpoint,
    # resume.
    train.main(tiny_args(scene, split, *common))
    os.remove(split / f'ckpt_{2 * n:07d}.pt')
    train.main(tiny_args(scene, split, *common, '--resume'))
    a = torch.load(straight / f'ckpt_{2 * n:07d}.pt', weights_only=False)
    b = torch.load(split / f'ckpt_{2 * n:07d}.pt', weights_only=False)
    return a, b, scalars(straight), scalars(split)


def test_resume_is_bit_exact_on_cpu(scene, tmp_path):
    a, b, sa, sb = run_split_and_straight(scene, tmp_path, 'cpu')
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for k in a['optimizer']['state']:
        for name in ('exp_avg', 'exp_avg_sq'):
            assert torch.equal(a['optimizer']['state'][k][name], b['optimizer']['state'][k][name])
    # The split run logs each step once more after the resume point only where steps repeat: none do.
    for tag in sa:
        steps_b = dict(sb[tag])
        assert [s for s, _ in sa[tag]] == sorted(steps_b), tag
        for s, v in sa[tag]:
            assert v == steps_b[s], (tag, s)


@needs_cuda
def test_resume_on_cuda_within_tolerance(scene, tmp_path):
    """CUDA's scatter-add in the backward of gather is not deterministic: parameters agree to 1e-4 relative."""
    a, b, sa, sb = run_split_and_straight(scene, tmp_path, 'cuda')
    for k in a['model']:
        diff = (a['model'][k].float() - b['model'][k].float()).norm()
        assert diff <= 1e-4 * a['model'][k].float().norm() + 1e-6, k
    assert abs(sa['test/psnr'][-1][1] - sb['test/psnr'][-1][1]) < 0.01


# ----------------------------------------------------------------------------
# 4. SIGINT and SIGTERM.


@pytest.mark.parametrize('sig,code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_save_and_exit_cleanly(scene, tmp_path, sig, code):
    log = tmp_path / 'run'
    proc = start_endless_run(scene, log)
    wait_for_checkpoint(log, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert 'Traceback' not in err
    name = signal.Signals(sig).name
    line = next(ln for ln in out.splitlines() if ln.startswith(f'{name}: stopped at step'))
    step = int(line.split('step ')[1].split(',')[0])
    assert f'saved {log}/ckpt_{step:07d}.pt' in line and 'continue with the same command plus --resume' in line
    assert torch.load(log / f'ckpt_{step:07d}.pt', weights_only=False)['step'] == step


# ----------------------------------------------------------------------------
# 5. Non-finite loss or gradient.


def test_nonfinite_steps_are_skipped_then_reload_with_half_the_rate(scene, tmp_path, monkeypatch, capsys):
    import datasets

    real = datasets.RaySampler.sample
    calls = {'n': 0}
    bad = {7, 8} | set(range(25, 31))  # 2 isolated bad steps, then 6 in a row

    def flaky(self):  # a NaN in the batch's target colours makes that step's loss NaN
        calls['n'] += 1
        rays, target = real(self)
        return rays, (target * float('nan') if calls['n'] in bad else target)

    monkeypatch.setattr(datasets.RaySampler, 'sample', flaky)
    log = tmp_path / 'run'
    train.main(tiny_args(scene, log, '--max_steps', '40', '--save_every', '20', '--max_nonfinite', '5'))
    out = capsys.readouterr().out
    # 7: the 6th bad step was launched before the 5th one's flag was read (train.py reads a step's flag
    # while the device runs the next), so the rollback discards it with the other parameters.
    assert out.count('non-finite loss or gradient; step skipped') == 7
    assert '(2 in a row)' in out and '(5 in a row)' in out
    assert f'5 non-finite steps in a row: reloaded {log}/ckpt_0000020.pt (step 20) and halved the learning rate' in out
    ckpt = torch.load(log / 'ckpt_0000040.pt', weights_only=False)
    assert ckpt['schedule']['scale'] == 0.5
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


# ----------------------------------------------------------------------------
# 6. A full disk while saving.


def test_full_disk_keeps_the_previous_checkpoint(scene, tmp_path, monkeypatch, capsys):
    real_save = torch.save
    saves = {'n': 0}

    def save_until_full(obj, f, *args, **kwargs):
        saves['n'] += 1
        if saves['n'] >= 2:
            f.write(b'partial bytes')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save_until_full)
    log = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(scene, log, '--max_steps', '30', '--save_every', '10'))
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert (
        f'could not save {log}/ckpt_0000020.pt: [Errno 28] No space left on device; {log}/ckpt_0000010.pt is intact'
        in out
    )
    assert 'the final checkpoint could not be saved' in err
    assert sorted(os.listdir(log)).count('ckpt_0000010.pt') == 1 and not list(log.glob('*.tmp'))
    monkeypatch.setattr(torch, 'save', real_save)
    assert torch.load(log / 'ckpt_0000010.pt', weights_only=False)['step'] == 10


# ----------------------------------------------------------------------------
# 7. Memory stays flat.


def host_memory_mb():
    """Resident memory of this process in MB (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


@pytest.mark.skipif(not os.path.exists('/proc/self/statm'), reason='reads /proc/self/statm (Linux)')
def test_host_memory_is_flat_over_5000_steps(scene, tmp_path, monkeypatch):
    import train_utils

    mem, log_scalars = {}, train_utils.log_scalars

    def probe(state, *args):  # the resident memory at each log_every
        log_scalars(state, *args)
        mem[state.step] = host_memory_mb()

    monkeypatch.setattr(train_utils, 'log_scalars', probe)
    log = tmp_path / 'run'
    train.main(
        tiny_args(scene, log, '--max_steps', '5000', '--batch_size', '64', '--log_every', '250', '--save_every', '2500')
    )
    assert len(mem) == 20
    growth = max(mem[s] for s in mem if s >= 1000) - mem[1000]
    assert growth < 8, mem  # MB between step 1,000 and step 5,000
