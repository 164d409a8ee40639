"""Fault injection, one class at a time: full disks, two writers, resumes that would destroy a
checkpoint, runs that cannot get past NaNs, signals during long renders, leftovers of crashes.
Each test names the promise it checks; misc/reliability.md lists them."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import eval as eval_script
import extract_mesh
import runs
import train
import train_utils
import visualize
from conftest import REPO
from test_reliability import PY, start_endless_run, tiny_args, wait_for_checkpoint


def digest(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def one_line_error(capsys, code, e):
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(err) == 1 and 'Traceback' not in err[0], err
    return err[0]


def partials(folder):
    return [n for n in os.listdir(folder) if '.partial' in n or n.endswith('.tmp') or n.endswith('.lock')]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp_path/'disk' (skipped where mounting is not allowed), and fill(leave) that
    leaves about `leave` bytes free on it."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    res = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(disk)], capture_output=True)
    if res.returncode != 0:
        pytest.skip('mounting a small tmpfs is not allowed here')

    def fill(leave=0):
        st = os.statvfs(disk)
        free = st.f_bavail * st.f_frsize
        with open(disk / 'filler', 'wb') as f:
            try:
                f.write(b'\0' * max(0, free - leave))
            except OSError:
                pass

    try:
        yield disk, fill
    finally:
        subprocess.run(['umount', '-l', str(disk)], capture_output=True)


# ----------------------------------------------------------------------------
# 1. A full disk never corrupts or replaces a good output.


def test_full_disk_keeps_the_previous_video(demo_run, small_disk, capsys):
    disk, fill = small_disk
    args = ['--log_dir', demo_run, '--device', 'cpu', '--render_factor', '4', '--out_dir', str(disk)]
    visualize.main(args + ['--n_frames', '4'])
    good = digest(disk / 'video.mp4')
    fill(leave=2000)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        visualize.main(args + ['--n_frames', '40', '--render_factor', '1'])
    line = one_line_error(capsys, 2, e)
    assert 'writing the videos' in line and 'disk' in line, line
    assert digest(disk / 'video.mp4') == good and not partials(disk)


def test_full_disk_keeps_the_previous_evaluation_and_mesh(demo_run, small_disk, capsys):
    disk, fill = small_disk
    evals, mesh = disk / 'eval', disk / 'mesh.ply'
    eval_script.main(['--log_dir', demo_run, '--device', 'cpu', '--out_dir', str(evals)])
    extract_mesh.main(['--log_dir', demo_run, '--device', 'cpu', '--grid_size', '24', '--out', str(mesh)])
    before = {n: digest(evals / n) for n in os.listdir(evals)}
    good_mesh = digest(mesh)
    fill(leave=1000)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_script.main(['--log_dir', demo_run, '--device', 'cpu', '--out_dir', str(evals)])
    assert '--out_dir' in one_line_error(capsys, 2, e)
    assert {n: digest(evals / n) for n in os.listdir(evals)} == before
    with pytest.raises(SystemExit) as e:
        extract_mesh.main(['--log_dir', demo_run, '--device', 'cpu', '--grid_size', '64', '--out', str(mesh)])
    assert 'writing' in one_line_error(capsys, 2, e)
    assert digest(mesh) == good_mesh and not partials(disk)


def test_full_disk_inside_torch_save_keeps_training(scene, small_disk, monkeypatch, capsys):
    """torch's zip writer reports a full disk as a RuntimeError: training says so and carries on."""
    disk, fill = small_disk
    log = disk / 'run'
    real = runs.save_checkpoint

    def save_then_fill(path, state):
        real(path, state)
        fill(leave=4000)  # the next checkpoint (about 40 KB) cannot fit

    monkeypatch.setattr(runs, 'save_checkpoint', save_then_fill)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(scene, log, '--max_steps', '20', '--save_every', '10'))
    out, err = capsys.readouterr()
    assert e.value.code == 1 and 'Traceback' not in err
    assert f'could not save {log}/ckpt_0000020.pt' in out and f'{log}/ckpt_0000010.pt is intact' in out
    assert 'the final checkpoint could not be saved' in err
    monkeypatch.undo()
    assert runs.read_checkpoint(str(log / 'ckpt_0000010.pt'), keys=runs.RESUME_KEYS)['step'] == 10
    assert not [n for n in os.listdir(log) if '.partial' in n]


def test_eval_log_that_cannot_be_written_keeps_training(scene, tmp_path, monkeypatch, capsys):
    def full(path, line):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(cli, 'append_line', full)
    train.main(tiny_args(scene, tmp_path / 'run', '--max_steps', '10', '--eval_every', '5'))
    out = capsys.readouterr().out
    assert 'eval.jsonl (No space left on device); training goes on' in out and 'done: 10 steps' in out


# ----------------------------------------------------------------------------
# 2. One run per folder; one writer per output.


def test_a_second_run_in_the_same_folder_is_refused(scene, tmp_path):
    log = tmp_path / 'run'
    first = start_endless_run(scene, log, stdout=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(log, first)
        second = subprocess.run(
            PY + tiny_args(scene, log, '--max_steps', '10', '--resume'), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2 and second.stderr.count('\n') == 1, second.stderr
        assert f'--log_dir {log} is in use by pid {first.pid} on ' in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143 and not (log / runs.LOCK).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(scene, tmp_path):
    log = tmp_path / 'run'
    log.mkdir()
    (log / runs.LOCK).write_text('pid 999999 on nowhere (train.py), since long ago')  # no process holds it
    train.main(tiny_args(scene, log, '--max_steps', '5'))
    assert (log / 'ckpt_0000005.pt').exists() and not (log / runs.LOCK).exists()


@pytest.mark.parametrize('script', ['visualize', 'eval', 'extract_mesh'])
def test_a_second_writer_of_the_same_output_is_refused(demo_run, tmp_path, capsys, script):
    out = tmp_path / 'out'
    module, output, flags = {
        'visualize': (visualize, out / 'video.mp4', ['--out_dir', str(out), '--n_frames', '2']),
        'eval': (eval_script, out / 'eval', ['--out_dir', str(out / 'eval')]),
        'extract_mesh': (extract_mesh, out / 'm.ply', ['--out', str(out / 'm.ply'), '--grid_size', '16']),
    }[script]
    out.mkdir()
    with cli.Lock(cli.lock_path(str(output))):  # another process writing it: this test's own pid
        with pytest.raises(SystemExit) as e:
            module.main(['--log_dir', demo_run, '--device', 'cpu', *flags])
        line = one_line_error(capsys, 2, e)
    assert f'is being written: in use by pid {os.getpid()}' in line
    assert not output.exists()


def test_two_processes_making_the_demo_scene_at_once_both_succeed(tmp_path):
    code = (
        'import sys; sys.path.insert(0, sys.argv[1]); import scenes; '
        'scenes.make_demo_scene(sys.argv[2], size=16, supersample=1, verbose=False)'
    )
    procs = [
        subprocess.Popen([sys.executable, '-c', code, REPO, str(tmp_path / 'demo')], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ['demo']
    assert len(os.listdir(tmp_path / 'demo' / 'train')) == 100


# ----------------------------------------------------------------------------
# 3. A resume never destroys a checkpoint.


def test_resume_refuses_a_checkpoint_without_what_it_needs(scene, tmp_path, capsys):
    log = tmp_path / 'run'
    train.main(tiny_args(scene, log, '--max_steps', '5'))
    ckpt = torch.load(log / 'ckpt_0000005.pt', weights_only=False)
    del ckpt['optimizer']
    torch.save(ckpt, log / 'ckpt_0000005.pt')
    before = digest(log / 'ckpt_0000005.pt')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(scene, log, '--max_steps', '10', '--resume'))
    line = one_line_error(capsys, 2, e)
    assert f'{log}/ckpt_0000005.pt is not a checkpoint of train.py (no optimizer)' in line
    assert digest(log / 'ckpt_0000005.pt') == before and not (log / 'ckpt_0000010.pt').exists()


def test_resume_skips_folders_and_broken_links_and_keeps_them(scene, tmp_path, capsys):
    log = tmp_path / 'run'
    train.main(tiny_args(scene, log, '--max_steps', '5'))
    (log / 'ckpt_0000007.pt').mkdir()
    os.symlink(tmp_path / 'nowhere.pt', log / 'ckpt_0000009.pt')
    capsys.readouterr()
    train.main(tiny_args(scene, log, '--max_steps', '10', '--resume'))
    out = capsys.readouterr().out
    assert 'ckpt_0000009.pt is a broken symbolic link' in out and 'ckpt_0000007.pt is a folder' in out
    assert f'resumed from {log}/ckpt_0000005.pt at step 5' in out
    assert (log / 'ckpt_0000007.pt.skipped').is_dir() and os.path.islink(log / 'ckpt_0000009.pt.skipped')


def test_resume_from_an_earlier_checkpoint_refuses_to_overwrite_later_ones(scene, tmp_path, capsys):
    log = tmp_path / 'run'
    train.main(tiny_args(scene, log, '--max_steps', '10', '--save_every', '5'))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(scene, log, '--max_steps', '20', '--resume', str(log / 'ckpt_0000005.pt')))
    assert 'holds later checkpoints (ckpt_0000010.pt) that this run would overwrite' in one_line_error(capsys, 2, e)


# ----------------------------------------------------------------------------
# 4. Recovery from non-finite steps compounds and terminates.


def test_rollbacks_compound_and_stop_after_max_rollbacks(scene, tmp_path, monkeypatch, capsys):
    import datasets

    real = datasets.RaySampler.sample
    monkeypatch.setattr(datasets.RaySampler, 'sample', lambda self: (real(self)[0], real(self)[1] * float('nan')))
    log = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(scene, log, '--max_steps', '50', '--max_nonfinite', '2', '--max_rollbacks', '3'))
    out, err = capsys.readouterr()
    assert e.value.code == 1 and err.count('\n') == 1 and 'through 3 rollbacks (--max_rollbacks)' in err
    for scale in ('0.5', '0.25', '0.125'):
        assert f'halved the learning rate (now {scale} x the schedule)' in out


def test_rollback_falls_back_past_a_truncated_checkpoint(scene, tmp_path, monkeypatch, capsys):
    """The rollback after non-finite steps takes the latest readable checkpoint, as --resume does."""
    import datasets

    real_save, real_sample, calls = runs.save_checkpoint, datasets.RaySampler.sample, {'n': 0}

    def torn_save(path, state):  # the checkpoint of step 10 is torn (a crash mid-copy, say)
        real_save(path, state)
        if path.endswith('ckpt_0000010.pt'):
            data = open(path, 'rb').read()
            open(path, 'wb').write(data[: len(data) // 2])

    def flaky(self):  # steps 11 and 12 are non-finite
        calls['n'] += 1
        rays, target = real_sample(self)
        return rays, (target * float('nan') if calls['n'] in (11, 12) else target)

    monkeypatch.setattr(runs, 'save_checkpoint', torn_save)
    monkeypatch.setattr(datasets.RaySampler, 'sample', flaky)
    log = tmp_path / 'run'
    train.main(tiny_args(scene, log, '--max_steps', '14', '--save_every', '5', '--max_nonfinite', '2'))
    assert f'reloaded {log}/ckpt_0000005.pt (step 5) and halved' in capsys.readouterr().out


# ----------------------------------------------------------------------------
# 5. Signals stop long renders within seconds.


def test_sigterm_during_the_final_evaluation_saves_and_stops_at_once(scene, tmp_path, monkeypatch, capsys):
    finished = []

    def slow_eval(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # a long render: the signal must cut it short
        finished.append(True)

    monkeypatch.setattr(train_utils, 'mean_psnr', slow_eval)
    log = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(scene, log, '--max_steps', '6', '--eval_every', '100'))
    assert e.value.code == 143 and not finished  # the render was cut short, not waited for
    assert f'SIGTERM: stopped at step 6, saved {log}/ckpt_0000006.pt' in capsys.readouterr().out


# ----------------------------------------------------------------------------
# 6. Nothing left behind.


def test_a_crash_s_partial_checkpoint_is_removed_at_the_next_start(scene, tmp_path, capsys):
    log = tmp_path / 'run'
    train.main(tiny_args(scene, log, '--max_steps', '5'))
    (log / 'ckpt_0000010.partial.pt').write_bytes(b'half')
    (log / 'ckpt_0000010.pt.tmp').write_bytes(b'half, older versions')
    train.main(tiny_args(scene, log, '--max_steps', '10', '--resume'))
    assert 'a checkpoint a crash left half-written' in capsys.readouterr().out
    assert sorted(n for n in os.listdir(log) if n.startswith('ckpt')) == ['ckpt_0000005.pt', 'ckpt_0000010.pt']


def test_a_killed_video_s_partial_file_is_replaced(demo_run, tmp_path):
    out = tmp_path / 'videos'
    out.mkdir()
    (out / 'video.partial.mp4').write_bytes(b'left by kill -9')
    visualize.main(['--log_dir', demo_run, '--device', 'cpu', '--n_frames', '2', '--out_dir', str(out)])
    assert sorted(os.listdir(out)) == ['video.mp4']


def test_atomic_output_keeps_the_old_file_on_any_failure(tmp_path):
    path = tmp_path / 'out.txt'
    path.write_text('good')
    for failure in (OSError('disk full'), KeyboardInterrupt(), cli.Stopped(signal.SIGTERM)):
        with pytest.raises(type(failure)), cli.atomic_output(str(path)) as tmp:
            open(tmp, 'w').write('half')
            raise failure
        assert path.read_text() == 'good' and os.listdir(tmp_path) == ['out.txt']

    def incomplete(tmp):
        raise OSError('incomplete')

    with pytest.raises(OSError, match='incomplete'), cli.atomic_output(str(path), check=incomplete) as tmp:
        open(tmp, 'w').write('bad')
    with pytest.raises(OSError, match='was not written'), cli.atomic_output(str(path)):
        pass
    assert path.read_text() == 'good' and os.listdir(tmp_path) == ['out.txt']
