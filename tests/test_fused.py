"""The fused Triton MLP computes the plain MLP's function and gradients.

The kernels run on CUDA; without a GPU they run in Triton's CPU interpreter
when Triton is installed and TRITON_INTERPRET=1 is set (a few seconds), and
these tests skip otherwise (CI's CPU install has no Triton). Both directions
are compared with the float32 PyTorch MLP, next to the error bf16 autocast of
the plain MLP makes against the same reference: the fused kernels round at the
same places (bf16 operands and activations, float32 accumulation).
"""
import os

import pytest
import torch

import fused_mlp
import ray_utils
from conftest import needs_cuda
from model import MipNeRF, ModelArgs
from test_model import make_rays

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
needs_kernels = pytest.mark.skipif(
    not fused_mlp.available() or not (torch.cuda.is_available() or INTERPRET),
    reason='the fused MLP needs Triton and CUDA (or TRITON_INTERPRET=1)')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'

NETS = {
    'default': dict(),                                                       # 8x256, skip after layer 4, IPE 96 -> 128
    'small': dict(net_width=64, net_depth=4, skip_layer=2, net_width_condition=32, max_deg_point=10),  # IPE 60 -> 64
    'noskip': dict(net_width=128, net_depth=3, skip_layer=0, net_width_condition=64, min_deg_point=2, max_deg_point=7),
}


def model_and_inputs(net, rays=37, samples=24, seed=0):
    torch.manual_seed(seed)
    m = MipNeRF(ModelArgs(num_samples=samples, **NETS[net])).to(DEVICE)
    with torch.no_grad():   # non-zero biases and a less regular function than the initialization
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = m.args
    gen = torch.Generator().manual_seed(seed + 1)
    mean = torch.randn(rays, samples, 3, generator=gen).to(DEVICE)
    cov = (torch.rand(rays, samples, 3, generator=gen) * 0.02).to(DEVICE)
    dirs = torch.nn.functional.normalize(torch.randn(rays, 3, generator=gen), dim=-1).to(DEVICE)
    return m, mean, cov, ray_utils.pos_enc(dirs, 0, a.deg_view, True)


def outputs_and_grads(m, precision, kernels, mean, cov, view):
    m.set_precision(precision)
    m.kernels = kernels
    m.zero_grad()
    rgb, dens = m.query(mean, cov, view)
    # Weighted sums so that every output channel carries a different gradient.
    w_rgb = torch.linspace(-1, 1, 3, device=rgb.device)
    w_den = torch.linspace(0.5, 1.5, dens.shape[-1], device=dens.device)
    ((rgb * w_rgb).sum() + (dens * w_den).sum()).backward()
    return rgb.detach(), dens.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@needs_kernels
@pytest.mark.parametrize('net', list(NETS))
def test_fused_mlp_matches_plain_forward_and_backward(net):
    m, mean, cov, view = model_and_inputs(net)
    x = ray_utils.integrated_pos_enc(mean, cov, m.args.min_deg_point, m.args.max_deg_point)
    m.set_precision('bf16')
    m.kernels = 'triton'
    assert m.use_fused(x), m.fused_reason(x.device)
    ref = outputs_and_grads(m, 'fp32', 'torch', mean, cov, view)
    auto = outputs_and_grads(m, 'bf16', 'torch', mean, cov, view)
    fused = outputs_and_grads(m, 'bf16', 'triton', mean, cov, view)
    assert fused[0].dtype == fused[1].dtype == torch.float32
    # The interpreter rounds to bf16 by truncation (the GPU to nearest): twice the error there.
    slack = 4 if INTERPRET else 2
    for i in (0, 1):
        assert rel(fused[i], ref[i]) < slack * rel(auto[i], ref[i]) + 2e-3, (i, rel(fused[i], ref[i]))
    for name, g in ref[2].items():
        e_fused, e_auto = rel(fused[2][name], g), rel(auto[2][name], g)
        assert e_fused < slack * e_auto + 0.01, (name, e_fused, e_auto)


@needs_kernels
def test_fused_render_path_equals_training_path():
    """Without gradients the kernel stores no activations; its outputs are the same numbers
    (up to float32 summation order: the two launches may use different row blocks)."""
    m, mean, cov, view = model_and_inputs('small', rays=100, samples=16)
    m.set_precision('bf16')
    m.kernels = 'triton'
    with torch.no_grad():
        rgb0, d0 = m.query(mean, cov, view)
    rgb1, d1 = m.query(mean, cov, view)
    assert rgb1.requires_grad
    torch.testing.assert_close(rgb0, rgb1.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d0, d1.detach(), rtol=1e-5, atol=1e-6)


@needs_kernels
def test_whole_model_with_fused_mlp_renders_like_plain():
    """Both levels, compositing and normals (which take the plain path: they need input gradients)."""
    torch.manual_seed(0)
    m = MipNeRF(ModelArgs(num_samples=16, **NETS['small'])).to(DEVICE).eval()
    m.set_precision('bf16')
    rays = make_rays((64,), torch.device(DEVICE))
    with torch.no_grad():
        m.kernels = 'torch'
        plain = m(rays)
        m.kernels = 'triton'
        fused = m(rays)
    for (r0, d0, a0), (r1, d1, a1) in zip(plain, fused):
        assert (r1 - r0).abs().max() < 0.02 and (a1 - a0).abs().max() < 0.02
    *_, normals = m(rays, normals=True)[-1]
    assert torch.isfinite(normals).all()


def test_packed_weights_follow_the_optimizer():
    """The kernels' copy of the weights is rebuilt after every parameter update (pure PyTorch; runs anywhere)."""
    torch.manual_seed(0)
    m = MipNeRF(ModelArgs(num_samples=8, **NETS['small']))
    p0 = m.packed_weights()
    assert m.packed_weights() is p0
    torch.testing.assert_close(p0.wh[1].float(), m.mlp.trunk[1].weight.t().bfloat16().float())
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    sum(p.sum() for p in m.parameters()).backward()
    opt.step()
    p1 = m.packed_weights()
    assert p1 is not p0
    torch.testing.assert_close(p1.wh[1].float(), m.mlp.trunk[1].weight.t().bfloat16().float())


@needs_cuda
@pytest.mark.parametrize('impl', ['foreach', 'fused'])
def test_packed_weights_follow_cuda_optimizers(impl):
    m = MipNeRF(ModelArgs(num_samples=8, **NETS['small'])).cuda()
    p0 = m.packed_weights()
    opt = m.watch_optimizer(torch.optim.Adam(m.parameters(), lr=1e-2, **{impl: True}))
    sum(p.sum() for p in m.parameters()).backward()
    opt.step()
    assert m.packed_weights() is not p0


def test_fused_reasons():
    m = MipNeRF(ModelArgs(num_samples=8, **NETS['small']))
    assert m.fused_reason('cuda') == '--kernels torch'   # the default
    m.kernels = 'triton'
    assert 'bf16' in m.fused_reason('cpu')
    m.set_precision('bf16')
    m.kernels = 'torch'
    assert m.fused_reason('cuda') == '--kernels torch'
    m.kernels = 'triton'
    if not fused_mlp.available():
        assert m.fused_reason('cuda') == 'Triton is not installed'
    m = MipNeRF(ModelArgs(num_samples=8, net_width=96))
    m.set_precision('bf16')
    m.kernels = 'triton'
    assert fused_mlp.supported(m.mlp) and 'powers of two' in fused_mlp.supported(m.mlp)
