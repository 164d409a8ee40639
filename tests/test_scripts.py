"""The download scripts, offline: curl fetches file:// archives made here."""
import os
import shutil
import subprocess
import zipfile

import pytest

from conftest import REPO

needs_tools = pytest.mark.skipif(not (shutil.which('curl') and shutil.which('unzip')),
                                 reason='curl and unzip are needed')

BLENDER = 'chair drums ficus hotdog lego materials mic ship'.split()
LLFF = 'fern flower fortress horns leaves orchids room trex'.split()


def run(script, data_dir, **env):
    return subprocess.run(['bash', os.path.join(REPO, 'scripts', script), str(data_dir)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


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


@pytest.mark.parametrize('script', ['download_blender.sh', 'download_llff.sh', 'download_multicam.sh',
                                    'download_data.sh', 'download_lib.sh'])
def test_scripts_parse(script):
    assert subprocess.run(['bash', '-n', os.path.join(REPO, 'scripts', script)]).returncode == 0


@needs_tools
def test_blender_download_unpacks_checks_and_is_idempotent(tmp_path):
    url = make_zip(tmp_path / 'ns.zip', blender_files())
    data = tmp_path / 'data'
    res = run('download_blender.sh', data, BLENDER_URL=url)
    assert res.returncode == 0, res.stderr
    assert f'Blender scenes are in {data}/nerf_synthetic' in res.stdout
    assert (data / 'nerf_synthetic' / 'lego' / 'transforms_train.json').is_file()
    assert not (data / 'nerf_synthetic.zip').exists() and not list(data.glob('.unpack*'))
    res = run('download_blender.sh', data, BLENDER_URL='file:///nonexistent.zip')   # no download needed
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
    assert res.returncode != 0 and 'layout is incomplete: missing' in res.stderr and 'ship/transforms_test.json' in res.stderr


@needs_tools
def test_llff_download(tmp_path):
    names = [f'nerf_llff_data/{s}/{f}' for s in LLFF
             for f in ('poses_bounds.npy', 'images/a.png', 'images_4/a.png', 'images_8/a.png')]
    data = tmp_path / 'data'
    res = run('download_llff.sh', data, LLFF_URL=make_zip(tmp_path / 'llff.zip', names))
    assert res.returncode == 0, res.stderr
    assert f'LLFF scenes are in {data}/nerf_llff_data' in res.stdout
    assert (data / 'nerf_llff_data' / 'trex' / 'images_8').is_dir()
