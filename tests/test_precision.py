"""Precision options and compiled code compute the same function as the plain float32 path."""

import os
import subprocess
import sys

import pytest
import torch

from config import ModelArgs
from conftest import REPO, demo_run_args, needs_cuda
from model import MipNeRF
from runs import set_precision
from test_model import make_rays

SMALL = dict(num_samples=16, net_width=64, net_depth=4, skip_layer=2, net_width_condition=32)


def pair(**kw):
    torch.manual_seed(0)
    a = MipNeRF(ModelArgs(**SMALL, **kw)).eval()
    b = MipNeRF(ModelArgs(**SMALL, **kw)).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def test_bf16_runs_only_the_mlp_in_bfloat16(device):
    ref, fast = pair()
    ref, fast = ref.to(device), fast.to(device)
    set_precision(fast, 'bf16')
    rays = make_rays((256,), device)
    with torch.no_grad():
        out_ref, out = ref(rays), fast(rays)
    for (r0, _, a0), (r1, d1, a1) in zip(out_ref, out):
        assert r1.dtype == d1.dtype == a1.dtype == torch.float32
        rel = (r1 - r0).norm() / r0.norm()
        assert rel < 1e-2, rel  # bf16 operands: 1e-3 .. 1e-2
        assert (a1 - a0).abs().max() < 0.05
    set_precision(ref, 'fp32')


def test_precision_flags():
    m = MipNeRF(ModelArgs(**SMALL))
    set_precision(m, 'tf32')
    assert torch.backends.cuda.matmul.allow_tf32 and not m.bf16
    set_precision(m, 'fp32')
    assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ValueError):
        set_precision(m, 'fp8')


def test_compiled_mlp_equals_plain_forward_and_backward():
    ref, fast = pair()
    fast.train()
    ref.train()
    fast.mlp.compile()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, 2 * 3 * 16, generator=gen)
    view = torch.randn(32, 27, generator=gen)
    outs = [m.mlp(x, view) for m in (ref, fast)]
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for rgb, dens in outs:
        (rgb.square().sum() + dens.sum()).backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # Compiling in place keeps the parameter names, so checkpoints stay interchangeable.
    assert list(ref.state_dict()) == list(fast.state_dict())


def test_compiled_ray_functions_equal_the_plain_ones_forward_and_backward():
    """`--compile` also compiles mip-NeRF's sampling, resampling and compositing: every level's outputs
    and every parameter's gradient as the eager functions, deterministic sampling (the compiled random
    jitter draws other numbers)."""
    ref, fast = pair()
    fast.compile_rays()
    rays = make_rays((48,), 'cpu')
    for m in (ref, fast):
        m.train()
        m.randomized = False
    outs = [m(rays) for m in (ref, fast)]
    for level_ref, level_fast in zip(*outs):
        for a, b in zip(level_ref, level_fast):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for out in outs:
        sum(rgb.square().sum() + dist.sum() for rgb, dist, _ in out).backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ref.ray_ops is None and fast.ray_ops is not None


@needs_cuda
def test_bf16_training_step_on_cuda_matches_fp32_closely():
    ref, fast = pair()
    ref, fast = ref.cuda().train(), fast.cuda().train()
    set_precision(fast, 'bf16')
    rays = make_rays((512,), 'cuda')
    torch.manual_seed(3)
    g_ref = torch.autograd.grad(ref(rays)[-1][0].sum(), list(ref.parameters()))
    torch.manual_seed(3)
    g_fast = torch.autograd.grad(fast(rays)[-1][0].sum(), list(fast.parameters()))
    for a, b in zip(g_ref, g_fast):
        assert (b - a).norm() <= 0.05 * a.norm() + 1e-6


def test_benchmark_smoke():
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'scripts', 'benchmark.py'),
            '--quick',
            '--device',
            'cpu',
            '--variants',
            'fp32',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-3].startswith('| variant | rays/s | ms/step | render s/frame')
    assert lines[-1].startswith('| fp32 |')


def test_compile_without_its_tool_chain_falls_back_to_the_plain_mlp_with_one_line(tiny_demo, tmp_path):
    """A machine that cannot torch.compile (here: no C++ compiler for inductor's CPU code): train.py
    --compile says so in one line and trains the plain MLP; benchmark.py refuses a +compile variant
    in one line. A fresh inductor cache, so that nothing compiled earlier hides the missing compiler."""
    env = dict(os.environ, CXX=str(tmp_path / 'no-such-c++'), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'cache'))
    args = demo_run_args(tiny_demo, tmp_path / 'run', '--compile', 'true', '--max_steps', '2', '--eval_every', '0')
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, 'train.py'), *args, '--render_every', '0'],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    said = [line for line in res.stdout.splitlines() if line.startswith('--compile:')]
    assert len(said) == 1 and 'C++ compiler' in said[0] and said[0].endswith('training the plain MLP'), said
    assert 'done: 2 steps' in res.stdout
    bench = [os.path.join(REPO, 'scripts', 'benchmark.py'), '--quick', '--device', 'cpu', '--variants', 'fp32+compile']
    res = subprocess.run([sys.executable, *bench], env=env, capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and 'drop +compile' in lines[0], res.stderr[-2000:]
