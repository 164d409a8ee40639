"""The fused MLP kernel (fused_mlp.py, fused_kernels.py) computes model.MLP under bf16 autocast.

On any machine: the weight packing and chunk schedule (`fused_mlp.emulate`, plain PyTorch) against
the float32 MLP, the shapes it takes, the one-line fallback, and (where Triton with Gluon is
installed) that the kernel compiles for sm_90a. On a Hopper GPU: the kernel itself against the
float32 MLP, with the plain bf16 MLP's error as the yardstick, and whole rendered images."""

import pytest
import torch

import fused_mlp
from config import ModelArgs
from model import MLP, MipNeRF
from model360 import MipNeRF360
from runs import set_precision
from test_model import make_rays

hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)), reason='needs a Hopper GPU'
)


def default_mlp(device='cpu', seed=0):
    """The default mip-NeRF MLP with random biases too (they start at zero), so that all are checked."""
    torch.manual_seed(seed)
    mlp = MLP(96, 27, 8, 256, 4).to(device)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            if name.endswith('bias'):
                p.normal_(0, 0.1)
    return mlp


def inputs(rays, samples, device='cpu', seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(rays, samples, 96, device=device, generator=g), torch.randn(rays, 27, device=device, generator=g)


def errors(mlp, x, cond, out):
    """Max |out - fp32| and |autocast bf16 - fp32| over rgb and density."""
    with torch.no_grad():
        ref = mlp(x, cond)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            ac = mlp(x, cond)
    e_out = max((o.float() - r).abs().max().item() for o, r in zip(out, ref))
    e_ac = max((a.float() - r).abs().max().item() for a, r in zip(ac, ref))
    return e_out, e_ac


def test_packing_and_schedule_compute_the_mlp():
    mlp = default_mlp()
    x, cond = inputs(6, 40)
    e, e_ac = errors(mlp, x, cond, fused_mlp.emulate(mlp, x, cond))
    assert e <= 2 * e_ac, (e, e_ac)  # bf16 rounding as autocast, fp32 sums in another order
    assert e_ac > 1e-4  # the yardstick is bf16's error, not zero


@pytest.mark.parametrize('swap', [(0, 1), (18, 22), (33, 34)])
def test_a_packing_mistake_is_caught(monkeypatch, swap):
    """The check above can fail: two chunks of the pack swapped (layer 0's, layer 5's h and x, the bottleneck's)."""
    pack = fused_mlp.pack

    def bad(mlp):
        pk = pack(mlp)
        w = pk['w'].view(fused_mlp.VIEW_C0, fused_mlp.WIDTH, fused_mlp.KC).clone()
        i, j = swap
        w[[i, j]] = w[[j, i]]
        return dict(pk, w=w.view(-1, fused_mlp.KC))

    monkeypatch.setattr(fused_mlp, 'pack', bad)
    mlp = default_mlp()
    x, cond = inputs(6, 40)
    e, e_ac = errors(mlp, x, cond, fused_mlp.emulate(mlp, x, cond))
    assert e > 5 * e_ac, (e, e_ac)


def test_supported_shapes():
    assert fused_mlp.supports(MipNeRF(ModelArgs()).mlp) is None
    assert 'trunk' in fused_mlp.supports(MLP(96, 27, 4, 64, 2))
    assert 'skip' in fused_mlp.supports(MLP(96, 27, 8, 256, 3))
    assert 'view' in fused_mlp.supports(MLP(96, 0, 8, 256, 4))
    m360 = MipNeRF360(ModelArgs(model='mipnerf360'))
    assert all(fused_mlp.supports(m) is not None for m in m360.modules() if isinstance(m, MLP))


def test_no_kernel_off_hopper_and_one_line_saying_so(monkeypatch):
    mlp = default_mlp()
    lines = []
    assert not fused_mlp.usable(mlp, torch.device('cpu'), log=lines.append)
    assert lines == []  # the CPU never had the kernel: nothing to say
    if not torch.cuda.is_available():
        monkeypatch.setattr(fused_mlp, '_TOLD', set())
        cuda = torch.device('cuda')
        assert not fused_mlp.usable(mlp, cuda, log=lines.append)
        assert not fused_mlp.usable(mlp, cuda, log=lines.append)
        assert len(lines) == 1 and 'CUDA is not available' in lines[0] and 'plain bf16 MLP' in lines[0], lines
    assert not fused_mlp.usable(MLP(96, 27, 4, 64, 2), torch.device('cpu'), log=lines.append)


def test_bf16_model_on_cpu_takes_the_plain_path(monkeypatch):
    def boom(*a):
        raise AssertionError('the fused kernel was called on the CPU')

    monkeypatch.setattr(fused_mlp, 'forward', boom)
    model = set_precision(MipNeRF(ModelArgs(num_samples=8)).eval(), 'bf16')
    with torch.no_grad():
        model(make_rays((4,), 'cpu'))


def test_kernel_compiles_for_hopper():
    """Triton's bundled ptxas builds the kernel for sm_90a without a GPU: within a CTA's shared memory."""
    pytest.importorskip('triton.experimental.gluon.language.nvidia.hopper')
    import fused_kernels

    k = fused_kernels.compile_offline()
    assert k.metadata.shared <= 232_448
    ptx = k.asm['ptx']
    assert 'wgmma.mma_async' in ptx and 'cp.async.bulk.tensor' in ptx and '.local' not in ptx


@hopper
@pytest.mark.parametrize('rays,samples', [(1, 128), (7, 37), (300, 128), (4096, 129)])
def test_kernel_matches_the_mlp(rays, samples):
    """One tile, a partial last tile, more tiles than SMs (the persistent loop), a render chunk's size."""
    assert fused_mlp.problem(torch.device('cuda')) is None
    mlp = default_mlp('cuda')
    x, cond = inputs(rays, samples, 'cuda')
    out = fused_mlp.forward(mlp, x, cond)
    assert all(o.dtype == torch.float32 and o.isfinite().all() for o in out)
    e, e_ac = errors(mlp, x, cond, out)
    assert e <= 3 * e_ac, (e, e_ac)


@hopper
def test_rendered_image_matches_the_plain_bf16_mlp(monkeypatch):
    torch.manual_seed(0)
    model = MipNeRF(ModelArgs()).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a non-trivial density everywhere
    rays = make_rays((24, 32), 'cuda')
    ref = model.render_image(rays)
    set_precision(model, 'bf16')
    assert fused_mlp.problem(torch.device('cuda')) is None  # (its probe runs the kernel once)
    calls = []
    forward = fused_mlp.forward
    monkeypatch.setattr(fused_mlp, 'forward', lambda *a: calls.append(1) or forward(*a))
    fast = model.render_image(rays)
    assert len(calls) == 2  # coarse and fine, one chunk
    monkeypatch.setattr(fused_mlp, 'usable', lambda *a: False)
    plain = model.render_image(rays)
    for f, p, r in zip(fast, plain, ref):
        assert (f - r).abs().max() <= 2 * (p - r).abs().max() + 1e-3
