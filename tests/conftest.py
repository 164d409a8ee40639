import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Real scenes (read-only, never committed): $MIPNERF_SHARED_DATA or ../shared/data.
SHARED = os.environ.get('MIPNERF_SHARED_DATA', os.path.join(REPO, '..', 'shared', 'data'))
LEGO = os.path.join(SHARED, 'nerf_synthetic', 'lego')
FERN = os.path.join(SHARED, 'nerf_llff_data', 'fern')

needs_lego = pytest.mark.skipif(not os.path.isdir(LEGO), reason=f'real lego scene not found at {LEGO}')
needs_fern = pytest.mark.skipif(not os.path.isdir(FERN), reason=f'real fern scene not found at {FERN}')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA is not available')

DEVICES = ['cpu', pytest.param('cuda', marks=needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope='session')
def tiny_demo(tmp_path_factory):
    """A 32x32 demo scene with few views, generated once per test session."""
    from scripts.make_demo import make_demo_scene
    path = str(tmp_path_factory.mktemp('scenes') / 'demo')
    make_demo_scene(path, size=32, supersample=2, views={'train': 20, 'val': 2, 'test': 3}, verbose=False)
    return path


# A network small enough for tests to train in seconds on a CPU.
TINY_NET = ['--num_samples', '8', '--net_depth', '2', '--net_width', '32', '--skip_layer', '1',
            '--net_width_condition', '16', '--max_deg_point', '6', '--deg_view', '2']
