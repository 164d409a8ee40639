"""loss.LPIPS's one-line note names the fix for each way LPIPS can fail to load (no network, no lpips needed)."""

import builtins
import socket
import sys
import types
import urllib.error
import warnings

import pytest
import torch

from loss import LPIPS


def fake_lpips(monkeypatch, build):
    """Install a stand-in `lpips` module whose `LPIPS(...)` is `build(...)`."""
    module = types.ModuleType('lpips')
    module.LPIPS = build
    monkeypatch.setitem(sys.modules, 'lpips', module)


def fail_import(monkeypatch, error):
    """Make `import lpips` raise `error`, as a broken install does."""
    real_import = builtins.__import__

    def import_(name, *args, **kwargs):
        if name == 'lpips':
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, 'lpips', raising=False)
    monkeypatch.setattr(builtins, '__import__', import_)


def check_skipped(fn):
    assert not fn.available
    assert fn.note.startswith('LPIPS skipped: ') and '\n' not in fn.note
    return fn.note


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'lpips', None)  # `import lpips` raises ModuleNotFoundError
    note = check_skipped(LPIPS('cpu'))
    assert 'lpips package is not installed' in note
    assert 'pip install -r requirements-eval.txt' in note
    assert 'download once' in note and 'MB' in note


def test_missing_torchvision_names_the_install(monkeypatch):
    fail_import(monkeypatch, ModuleNotFoundError("No module named 'torchvision'", name='torchvision'))
    note = check_skipped(LPIPS('cpu'))
    assert 'torchvision package is not installed' in note and 'pip install -r requirements-eval.txt' in note


def test_mismatched_torchvision(monkeypatch):
    # What PyPI's (CUDA) torchvision raises on import next to a CPU-only torch.
    fail_import(monkeypatch, RuntimeError('operator torchvision::nms does not exist'))
    note = check_skipped(LPIPS('cpu'))
    assert 'torchvision does not load with torch' in note and 'operator torchvision::nms does not exist' in note
    assert 'requirements-eval.txt' in note


def offline(*args, **kwargs):
    """What torch.hub's download of the VGG16 weights raises without a network."""
    raise urllib.error.URLError(socket.gaierror(-2, 'Name or service not known'))


def test_offline_weights_say_where_they_go(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    fake_lpips(monkeypatch, offline)
    note = check_skipped(LPIPS('cpu'))
    assert 'weights could not be downloaded' in note and 'URLError' in note
    assert LPIPS.VGG_URL in note
    assert str(tmp_path / 'hub' / 'checkpoints' / 'vgg16-397923af.pth') in note


def test_other_errors_give_their_first_line(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def corrupt(*args, **kwargs):
        raise ValueError('bad checkpoint\nsecond line')

    fake_lpips(monkeypatch, corrupt)
    assert check_skipped(LPIPS('cpu')) == 'LPIPS skipped: ValueError: bad checkpoint'

    # An OSError with the weights already cached is not a download problem.
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'hub' / 'checkpoints' / 'vgg16-397923af.pth').touch()
    fake_lpips(monkeypatch, offline)
    assert 'could not be downloaded' not in check_skipped(LPIPS('cpu'))


class MeanAbs(torch.nn.Module):
    def forward(self, x, y):
        return (x - y).abs().mean()


def test_loaded_lpips_is_available_and_quiet(monkeypatch):
    def build(net, version, verbose):
        assert (net, version) == ('vgg', '0.1')
        warnings.warn(
            "The parameter 'pretrained' is deprecated since 0.13 and may be removed in the future, "
            "please use 'weights' instead.",
            stacklevel=2,
        )  # as torchvision does for lpips
        return MeanAbs()

    fake_lpips(monkeypatch, build)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fn = LPIPS('cpu')
    assert fn.available and fn.note == ''
    a = torch.zeros(4, 4, 3)
    assert fn(a, a) == 0.0
    assert fn(a, torch.ones(4, 4, 3)) == pytest.approx(2.0)  # images in [0, 1] are mapped to [-1, 1]
