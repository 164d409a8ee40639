import os
import shutil
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Real scenes (read-only, never committed): $MIPNERF_SHARED_DATA or ../shared/data.
SHARED = os.environ.get('MIPNERF_SHARED_DATA', os.path.join(REPO, '..', 'shared', 'data'))
LEGO = os.path.join(SHARED, 'nerf_synthetic', 'lego')
FERN = os.path.join(SHARED, 'nerf_llff_data', 'fern')

needs_lego = pytest.mark.skipif(
    not os.path.isdir(LEGO),
    reason=(
        f'real lego scene not found at {os.path.normpath(LEGO)}: set MIPNERF_SHARED_DATA to a folder holding '
        f'nerf_synthetic/lego (default ../shared/data; scripts/download_blender.sh fills data/)'
    ),
)
needs_fern = pytest.mark.skipif(
    not os.path.isdir(FERN),
    reason=(
        f'real fern scene not found at {os.path.normpath(FERN)}: set MIPNERF_SHARED_DATA to a folder holding '
        f'nerf_llff_data/fern (default ../shared/data; scripts/download_llff.sh fills data/)'
    ),
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA is not available')

DEVICES = ['cpu', pytest.param('cuda', marks=needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope='session')
def tiny_demo(tmp_path_factory):
    """A 32x32 demo scene with few views, generated once per test session."""
    from scenes import make_demo_scene

    path = str(tmp_path_factory.mktemp('scenes') / 'demo')
    make_demo_scene(path, size=32, supersample=2, views={'train': 20, 'val': 2, 'test': 3}, verbose=False)
    return path


@pytest.fixture
def scene(tiny_demo, tmp_path):
    """A copy of the tiny demo scene that a test may damage."""
    dst = tmp_path / 'scene'
    shutil.copytree(tiny_demo, dst)
    return dst


# A network small enough for tests to train in seconds on a CPU.
TINY_NET = (
    '--num_samples 8 --net_depth 2 --net_width 32 --skip_layer 1 '
    '--net_width_condition 16 --max_deg_point 6 --deg_view 2'
).split()


# The mip-NeRF 360 network made tiny (configs/360.txt's structure: proposal rounds, bottleneck).
TINY_360 = '--bottleneck_width 16 --prop_net_depth 2 --prop_net_width 16 --num_prop_samples 16'.split()


def demo_run_args(scene, log_dir, *extra, dataset='demo'):
    """train.py's flags for a tiny, fast run on the CPU on a demo-style scene (its near and far, a
    high learning rate, TINY_NET); `extra` flags come last, so they win."""
    return [
        *('--dataset_name', dataset, '--base_dir', str(scene), '--log_dir', str(log_dir), '--device', 'cpu'),
        *'--near 2.5 --far 5.5 --lr_init 5e-3 --lr_final 5e-4'.split(),
        *TINY_NET,
        *extra,
    ]


def make_blender_subset(src, dst, counts):
    """A nerf_synthetic scene holding the first `counts[split]` frames of `src` (images linked)."""
    import json

    os.makedirs(dst)
    for split, n in counts.items():
        with open(os.path.join(src, f'transforms_{split}.json')) as f:
            meta = json.load(f)
        meta['frames'] = meta['frames'][:n]
        os.makedirs(os.path.join(dst, split))
        for frame in meta['frames']:
            name = frame['file_path'] + '.png'
            os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
        with open(os.path.join(dst, f'transforms_{split}.json'), 'w') as f:
            json.dump(meta, f)
    return dst


@pytest.fixture(scope='session')
def lego_subset(tmp_path_factory):
    """The real lego with 3 training and 2 test views (no val split)."""
    if not os.path.isdir(LEGO):
        pytest.skip(
            f'real lego scene not found at {os.path.normpath(LEGO)}: set MIPNERF_SHARED_DATA to a folder '
            f'holding nerf_synthetic/lego (default ../shared/data; scripts/download_blender.sh fills data/)'
        )
    return make_blender_subset(LEGO, str(tmp_path_factory.mktemp('lego') / 'lego'), {'train': 3, 'test': 2})


@pytest.fixture(scope='session')
def lego_multicam(lego_subset, tmp_path_factory):
    """lego_subset converted by scripts/convert_blender_data.py."""
    from scripts.convert_blender_data import convert_scene

    out = str(tmp_path_factory.mktemp('multiscale') / 'lego')
    convert_scene(lego_subset, out, verbose=False)
    return out


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
    """The demo config trained for 250 steps of 512 rays on a 64x64 demo scene (about 40 s on 2 CPU cores)."""
    import train
    from scenes import make_demo_scene

    root = tmp_path_factory.mktemp('demo_run')
    scene, run = str(root / 'scene'), str(root / 'run')
    make_demo_scene(scene, size=64, supersample=2, views={'train': 50, 'val': 1, 'test': 4}, verbose=False)
    train.main(
        [
            '--config',
            'demo.txt',
            '--base_dir',
            scene,
            '--log_dir',
            run,
            '--device',
            'cpu',
            '--max_steps',
            '250',
            '--batch_size',
            '512',
            '--lr_delay_steps',
            '30',
            '--eval_every',
            '0',
            '--render_every',
            '0',
            '--save_every',
            '0',
        ]
    )
    return run
