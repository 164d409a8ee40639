"""visualize.py and extract_mesh.py refuse bad input in one line and leave nothing half-written."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import trimesh

import extract_mesh
import meshing
import train
import visualize
from conftest import REPO, TINY_NET


@pytest.fixture(scope='module')
def run(tiny_demo, tmp_path_factory):
    """A 2-step run of the tiny network on the 32x32 demo scene (a few seconds)."""
    log = str(tmp_path_factory.mktemp('render_cli') / 'run')
    train.main(
        [
            '--dataset_name',
            'demo',
            '--base_dir',
            tiny_demo,
            '--log_dir',
            log,
            '--device',
            'cpu',
            '--near',
            '2.5',
            '--far',
            '5.5',
            '--batch_size',
            '64',
            '--max_steps',
            '2',
            '--lr_delay_steps',
            '0',
            '--eval_every',
            '0',
            '--render_every',
            '0',
            '--save_every',
            '0',
            *TINY_NET,
        ]
    )
    return log


def last_line(err):
    """The last line of stderr, progress bars (carriage returns) split off."""
    return err.replace('\r', '\n').strip().splitlines()[-1]


@pytest.fixture
def refuse(capsys):
    """main(args) exits with `code` and one stderr line `<prog>: error: ...` holding `needle`; `paths` don't exist.

    Runs in this process: any exception other than SystemExit (a traceback) fails the test.
    """

    def check(script, args, needle, *paths, code=2):
        with pytest.raises(SystemExit) as e:
            script.main(args)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert e.value.code == code, err
        assert len(lines) == 1 and lines[0].startswith(f'{script.PROG}: error: ') and needle in lines[0], err
        for p in paths:
            assert not os.path.exists(p), f'{p} was left behind'
        return lines[0]

    return check


def test_every_flag_has_help():
    for script in (visualize, extract_mesh):
        for action in script.build_parser()._actions:
            assert action.help, (script.PROG, action.option_strings)


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='needs /proc')
@pytest.mark.parametrize(
    'script,flags,needle',
    [
        ('visualize.py', ['--out_dir', '/proc/x'], '--out_dir /proc/x: cannot write there'),
        ('extract_mesh.py', ['--out', '/proc/x/mesh.ply'], '--out /proc/x/mesh.ply: cannot write there'),
    ],
)
def test_unwritable_output_is_refused_before_rendering(run, script, flags, needle):
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, script), '--log_dir', run, '--device', 'cpu', *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr
    assert lines[0].startswith(f'{script}: error: {needle}'), res.stderr


def test_output_folder_that_is_a_file(run, tmp_path, refuse):
    (tmp_path / 'taken').write_text('')
    refuse(
        visualize,
        ['--log_dir', run, '--device', 'cpu', '--out_dir', str(tmp_path / 'taken' / 'videos')],
        'cannot write there',
    )
    refuse(
        extract_mesh,
        ['--log_dir', run, '--device', 'cpu', '--out', str(tmp_path / 'taken' / 'm.ply')],
        'cannot write there',
    )


@pytest.mark.parametrize(
    'flags,needle',
    [
        (['--render_factor', '1000'], '--render_factor 1000: the images are 32x32, so it can be at most 32'),
        (['--radius', '0'], 'argument --radius: must be a positive number'),
        (['--radius', '-4'], 'argument --radius: must be a positive number'),
        (['--path', 'zoom', '--zoom_near', '-1', '--zoom_far', '0'], 'argument --zoom_near: must be a positive number'),
        (['--path', 'zoom', '--zoom_near', '3', '--zoom_far', '2'], '--zoom_far (2) must exceed --zoom_near (3)'),
        (['--path', 'zoom', '--zoom_near', '100'], '--zoom_far ('),
        (['--n_frames', '0'], 'argument --n_frames: must be positive'),
        (['--fps', '0'], 'argument --fps: must be a positive number'),
    ],
)
def test_visualize_refuses_bad_flags(run, tmp_path, flags, needle, refuse):
    out = tmp_path / 'new' / 'videos'
    refuse(visualize, ['--log_dir', run, '--device', 'cpu', '--out_dir', str(out), *flags], needle, tmp_path / 'new')


@pytest.mark.parametrize(
    'flags,needle',
    [
        (['--grid_size', '100000'], 'free memory here; use --grid_size'),
        (['--grid_size', '1'], '--grid_size must be at least 2'),
        (['--min_component', '2'], '--min_component must be between 0 and 1'),
        (['--min_component', '-0.5'], '--min_component must be between 0 and 1'),
        (['--bbox', '0', '0', '0', '1', '0', '1'], '--bbox 0 0 0 1 0 1'),
    ],
)
def test_extract_mesh_refuses_bad_flags(run, tmp_path, flags, needle, refuse):
    refuse(
        extract_mesh,
        ['--log_dir', run, '--device', 'cpu', '--out', str(tmp_path / 'new' / 'm.ply'), *flags],
        needle,
        tmp_path / 'new',
    )


def test_grid_size_limit_fits_the_memory():
    line = extract_mesh.check_grid_size(1000, free=100 * 2**20)
    largest = int(line.split('use --grid_size ')[1].split()[0])
    assert 4 * largest**3 <= 0.8 * 100 * 2**20 < 4 * (largest + 1) ** 3
    assert extract_mesh.check_grid_size(largest, free=100 * 2**20) is None


def ball_grid(density_fn, lo, hi, n, *args, **kwargs):
    """A density grid holding a ball (density 10 inside, 0 outside), instead of the model's."""
    x = np.linspace(-1, 1, n, dtype=np.float32)
    r = np.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)
    return np.where(r < 0.6, 10.0, 0.0).astype(np.float32)


def test_empty_meshes_are_refused(run, tmp_path, monkeypatch, refuse):
    monkeypatch.setattr(meshing, 'density_grid', ball_grid)
    args = ['--log_dir', run, '--device', 'cpu', '--grid_size', '16', '--out', str(tmp_path / 'new' / 'm.ply')]
    refuse(extract_mesh, args + ['--threshold', '1e6'], 'no surface', tmp_path / 'new')
    args += ['--threshold', '5']
    monkeypatch.setattr(meshing, 'remove_small_components', lambda mesh, fraction: trimesh.Trimesh())
    refuse(extract_mesh, args, 'lower --min_component', tmp_path / 'new')
    monkeypatch.setattr(meshing, 'grid_to_mesh', lambda *a: (np.zeros((0, 3)), np.zeros((0, 3), np.int64)))
    refuse(extract_mesh, args, 'the mesh is empty', tmp_path / 'new')


def test_extract_mesh_sigterm_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return ball_grid(*args)

    monkeypatch.setattr(meshing, 'density_grid', stopped)
    with pytest.raises(SystemExit) as e:
        extract_mesh.main(['--log_dir', run, '--device', 'cpu', '--out', str(tmp_path / 'new' / 'm.ply')])
    err = capsys.readouterr().err
    assert e.value.code == 143 and 'Traceback' not in err
    assert last_line(err) == 'extract_mesh.py: stopped by SIGTERM; nothing written'
    assert not (tmp_path / 'new').exists()


def interrupt_at_frame(monkeypatch, k, action):
    """Make visualize call `action()` when it starts rendering frame k (0-based)."""
    real, calls = visualize.render_frame, []

    def render_frame(*args):
        calls.append(1)
        if len(calls) == k + 1:
            action()
        return real(*args)

    monkeypatch.setattr(visualize, 'render_frame', render_frame)


def test_ctrl_c_during_the_first_frame(run, tmp_path, monkeypatch, capsys):
    """No video file exists yet (ffmpeg starts at the first frame): the cleanup must not trip over that."""
    interrupt_at_frame(monkeypatch, 0, lambda: os.kill(os.getpid(), signal.SIGINT))
    out = tmp_path / 'new' / 'videos'
    with pytest.raises(SystemExit) as e:
        visualize.main(['--log_dir', run, '--device', 'cpu', '--out_dir', str(out), '--visualize_depth'])
    err = capsys.readouterr().err
    assert e.value.code == 130 and 'Traceback' not in err, err
    assert last_line(err) == 'visualize.py: stopped by SIGINT; partial videos removed, nothing written'
    assert not (tmp_path / 'new').exists()


def test_a_failure_in_the_first_frame_is_reported_as_itself(run, tmp_path, monkeypatch):
    def boom():
        raise RuntimeError('boom')

    interrupt_at_frame(monkeypatch, 0, boom)
    with pytest.raises(RuntimeError, match='boom'):
        visualize.main(['--log_dir', run, '--device', 'cpu', '--out_dir', str(tmp_path / 'new')])
    assert not (tmp_path / 'new').exists()


def test_sigterm_mid_video_removes_the_partial_files(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'videos'
    out.mkdir()  # a folder that was there before stays, empty

    def sigterm():  # once ffmpeg (started at the first frame) has made both files
        t = time.time()
        while not ((out / 'video.partial.mp4').exists() and (out / 'depth.partial.mp4').exists()):
            assert time.time() - t < 30, os.listdir(out)
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    interrupt_at_frame(monkeypatch, 2, sigterm)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        visualize.main(['--log_dir', run, '--device', 'cpu', '--out_dir', str(out), '--visualize_depth'])
    err = capsys.readouterr().err
    assert e.value.code == 143 and 'Traceback' not in err, err
    assert last_line(err) == 'visualize.py: stopped by SIGTERM; partial videos removed, nothing written'
    assert os.listdir(out) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
