"""The download scripts, offline: curl fetches file:// archives made here."""

import json
import os
import shutil
import subprocess
import zipfile

import pytest

from conftest import REPO

needs_tools = pytest.mark.skipif(
    not (shutil.which('curl') and shutil.which('unzip')), reason='curl and unzip are needed'
)

BLENDER = 'chair drums ficus hotdog lego materials mic ship'.split()
LLFF = 'fern flower fortress horns leaves orchids room trex'.split()


def run(script, data_dir, **env):
    return subprocess.run(
        ['bash', os.path.join(REPO, 'scripts', script), str(data_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def blender_files(root='nerf_synthetic', skip=None):
    for s in BLENDER:
        for f in ('transforms_train.json', 'transforms_val.json', 'transforms_test.json', 'train/r_0.png'):
            if f'{s}/{f}' != skip:
                yield f'{root}/{s}/{f}'


def make_zip(path, names):
    with zipfile.ZipFile(path, 'w') as z:
        for n in names:
            z.writestr(n, '{}')
    return f'file://{path}'


def make_layouts(data):
    """Complete (empty-file) layouts of the three datasets in `data`, as the scripts' checks want them."""
    names = [
        *blender_files(),
        *(f'nerf_llff_data/{s}/{f}' for s in LLFF for f in ('poses_bounds.npy', 'images/', 'images_4/', 'images_8/')),
        *(f'nerf_multiscale/{s}/metadata.json' for s in BLENDER),
    ]
    for n in names:
        p = data / n
        if n.endswith('/'):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text('{}')


def make_blender_zip(path, png=True):
    """nerf_synthetic with one 16x16 RGBA frame per scene and split that convert_blender_data.py can read
    (with png=False the frames are not images)."""
    import cv2
    import numpy as np

    img = cv2.imencode('.png', np.full((16, 16, 4), 200, np.uint8))[1].tobytes() if png else b'not a png'
    meta = json.dumps(
        {'camera_angle_x': 0.69, 'frames': [{'file_path': './train/r_0', 'transform_matrix': np.eye(4).tolist()}]}
    )
    with zipfile.ZipFile(path, 'w') as z:
        for name in blender_files():
            z.writestr(name, img if name.endswith('.png') else meta)
    return f'file://{path}'


def last_line(text):
    return text.strip().splitlines()[-1] if text.strip() else ''


@needs_tools
def test_multicam_download_fetches_converts_and_is_idempotent(tmp_path):
    """download_multicam.sh downloads nerf_synthetic, converts all eight scenes (4 scales per image)
    and, run again, does nothing, not even a download."""
    data = tmp_path / 'data'
    res = run('download_multicam.sh', data, BLENDER_URL=make_blender_zip(tmp_path / 'ns.zip'))
    assert res.returncode == 0, res.stderr
    assert last_line(res.stdout) == f'multiscale scenes are in {data}/nerf_multiscale'
    for s in BLENDER:
        meta = json.loads((data / 'nerf_multiscale' / s / 'metadata.json').read_text())
        assert meta['train']['label'] == [0, 1, 2, 3] and meta['train']['width'] == [16, 8, 4, 2]
    res = run('download_multicam.sh', data, BLENDER_URL='file:///nonexistent.zip')
    assert res.returncode == 0 and res.stdout == f'multiscale scenes already in {data}/nerf_multiscale\n'


@needs_tools
def test_multicam_download_fails_loudly(tmp_path):
    """A failed download or a failed conversion stops download_multicam.sh with a non-zero status,
    an `error:` line last and no nerf_multiscale scene left behind."""
    data = tmp_path / 'data'
    res = run('download_multicam.sh', data, BLENDER_URL='file:///nonexistent.zip')
    assert res.returncode != 0
    assert last_line(res.stderr).startswith('error: download of file:///nonexistent.zip failed')
    assert not (data / 'nerf_multiscale').exists()
    res = run('download_multicam.sh', data, BLENDER_URL=make_blender_zip(tmp_path / 'bad.zip', png=False))
    assert res.returncode != 0 and last_line(res.stderr) == 'error: conversion failed'
    assert 'convert_blender_data.py: error: cannot read' in res.stderr and 'Traceback' not in res.stderr
    assert not list((data / 'nerf_multiscale').glob('*/metadata.json'))


@needs_tools
def test_download_data_runs_every_script_and_stops_at_the_first_failure(tmp_path):
    """download_data.sh runs the Blender, LLFF and multiscale scripts in turn (each finding its data),
    and a failing one ends it with that script's error: the later ones do not run, no success line."""
    data = tmp_path / 'data'
    make_layouts(data)
    res = run('download_data.sh', data, BLENDER_URL='file:///nonexistent.zip', LLFF_URL='file:///nonexistent.zip')
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f'Blender scenes already in {data}/nerf_synthetic',
        f'LLFF scenes already in {data}/nerf_llff_data',
        f'multiscale scenes already in {data}/nerf_multiscale',
        f'all datasets are in {data}',
    ]
    shutil.rmtree(data / 'nerf_llff_data' / 'trex')
    res = run('download_data.sh', data, BLENDER_URL='file:///nonexistent.zip', LLFF_URL='file:///nonexistent.zip')
    assert res.returncode != 0
    assert last_line(res.stderr).startswith('error: download of file:///nonexistent.zip failed')
    assert 'multiscale' not in res.stdout and 'all datasets' not in res.stdout


@needs_tools
@pytest.mark.parametrize(
    'script,found',
    [
        pytest.param(s, f, id=s)
        for s, f in [
            ('download_blender.sh', 'Blender scenes already in {}/nerf_synthetic'),
            ('download_llff.sh', 'LLFF scenes already in {}/nerf_llff_data'),
            ('download_multicam.sh', 'multiscale scenes already in {}/nerf_multiscale'),
            ('download_data.sh', 'all datasets are in {}'),
        ]
    ],
)
def test_relative_data_dir_is_taken_from_the_callers_folder(tmp_path, script, found):
    """A relative DATA_DIR names a folder under the caller's working directory, not the repository."""
    make_layouts(tmp_path / 'rel' / 'data')
    res = subprocess.run(
        ['bash', os.path.join(REPO, 'scripts', script), 'rel/data'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'BLENDER_URL': 'file:///nonexistent.zip', 'LLFF_URL': 'file:///nonexistent.zip'},
    )
    assert res.returncode == 0, res.stderr
    assert last_line(res.stdout) == found.format(tmp_path / 'rel' / 'data')
    assert not os.path.exists(os.path.join(REPO, 'rel'))


@needs_tools
def test_blender_download_unpacks_checks_and_is_idempotent(tmp_path):
    url = make_zip(tmp_path / 'ns.zip', blender_files())
    data = tmp_path / 'data'
    res = run('download_blender.sh', data, BLENDER_URL=url)
    assert res.returncode == 0, res.stderr
    assert f'Blender scenes are in {data}/nerf_synthetic' in res.stdout
    assert (data / 'nerf_synthetic' / 'lego' / 'transforms_train.json').is_file()
    assert not (data / 'nerf_synthetic.zip').exists() and not list(data.glob('.unpack*'))
    res = run('download_blender.sh', data, BLENDER_URL='file:///nonexistent.zip')  # no download needed
    assert res.returncode == 0 and 'already in' in res.stdout


@needs_tools
def test_blender_download_fails_loudly(tmp_path):
    data = tmp_path / 'data'
    res = run('download_blender.sh', data, BLENDER_URL='file:///nonexistent.zip')
    assert res.returncode != 0 and 'error: download of file:///nonexistent.zip failed' in res.stderr
    assert not list(data.glob('*.partial'))
    (tmp_path / 'page.zip').write_text('<html>quota exceeded</html>')
    res = run('download_blender.sh', data, BLENDER_URL=f'file://{tmp_path}/page.zip')
    assert res.returncode != 0 and 'did not give a valid zip archive' in res.stderr
    assert not list(data.glob('*.partial'))
    url = make_zip(tmp_path / 'broken.zip', blender_files(skip='ship/transforms_test.json'))
    res = run('download_blender.sh', data, BLENDER_URL=url)
    assert res.returncode != 0 and 'layout is incomplete: missing' in res.stderr
    assert 'ship/transforms_test.json' in res.stderr


@needs_tools
def test_llff_download(tmp_path):
    names = [
        f'nerf_llff_data/{s}/{f}'
        for s in LLFF
        for f in ('poses_bounds.npy', 'images/a.png', 'images_4/a.png', 'images_8/a.png')
    ]
    data = tmp_path / 'data'
    res = run('download_llff.sh', data, LLFF_URL=make_zip(tmp_path / 'llff.zip', names))
    assert res.returncode == 0, res.stderr
    assert f'LLFF scenes are in {data}/nerf_llff_data' in res.stdout
    assert (data / 'nerf_llff_data' / 'trex' / 'images_8').is_dir()
