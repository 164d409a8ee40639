import math

import torch

from config import ModelArgs
from conftest import needs_cuda
from model import MipNeRF
from ray_utils import Rays


def make_rays(shape, device='cpu', seed=0):
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(shape + (3,), generator=gen) * 0.1 + torch.tensor([0.0, 0.0, 4.0])
    d = torch.randn(shape + (3,), generator=gen) * 0.2 + torch.tensor([0.0, 0.0, -1.0])
    ones = torch.ones(shape + (1,))
    rays = Rays(o, d, d / d.norm(dim=-1, keepdim=True), ones * 0.002, ones, ones * 2.0, ones * 6.0)
    return Rays(*(r.to(device) for r in rays))


def test_architecture_matches_official_release():
    m = MipNeRF(ModelArgs())
    ipe, view = 2 * 3 * 16, 3 + 2 * 3 * 4
    assert [layer.in_features for layer in m.mlp.trunk] == [ipe, 256, 256, 256, 256, 256 + ipe, 256, 256]
    assert all(layer.out_features == 256 for layer in m.mlp.trunk)
    assert (m.mlp.density.in_features, m.mlp.density.out_features) == (256, 1)
    assert (m.mlp.bottleneck.in_features, m.mlp.bottleneck.out_features) == (256, 256)
    assert [(layer.in_features, layer.out_features) for layer in m.mlp.condition] == [(256 + view, 128)]
    assert (m.mlp.rgb.in_features, m.mlp.rgb.out_features) == (128, 3)
    expected = (
        (ipe + 1) * 256 + 6 * 257 * 256 + (256 + ipe + 1) * 256 + 257 + 257 * 256 + (256 + view + 1) * 128 + 129 * 3
    )
    assert sum(p.numel() for p in m.parameters()) == expected


def test_glorot_uniform_init_and_zero_bias():
    torch.manual_seed(0)
    m = MipNeRF(ModelArgs())
    for layer in [*m.mlp.trunk, m.mlp.density, m.mlp.rgb]:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
        assert torch.all(layer.bias == 0)


def test_zero_network_gives_softplus_bias_density_and_padded_grey():
    m = MipNeRF(ModelArgs(num_samples=64), randomized=False)
    for p in m.parameters():
        torch.nn.init.zeros_(p)
    rays = make_rays((5,))
    (_, _, acc_c), (rgb, dist, acc) = m(rays)
    sigma = math.log1p(math.exp(-1.0))  # softplus(0 - 1)
    expected_acc = 1 - torch.exp(-sigma * 4.0 * rays.directions.norm(dim=-1))
    torch.testing.assert_close(acc, expected_acc, rtol=1e-5, atol=1e-6)
    grey = 0.5 * 1.002 - 0.001
    torch.testing.assert_close(rgb, (grey * acc + 1 - acc)[:, None].expand(5, 3), rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic_and_training_is_jittered():
    torch.manual_seed(0)
    m = MipNeRF(ModelArgs(num_samples=16, density_noise=1.0))
    rays = make_rays((64,))
    m.eval()
    a, b = m(rays)[-1][0], m(rays)[-1][0]
    assert torch.equal(a, b)
    m.train()
    c, d = m(rays)[-1][0], m(rays)[-1][0]
    assert not torch.equal(c, d)
    m_fixed = MipNeRF(m.args, randomized=False)
    m_fixed.load_state_dict(m.state_dict())
    m_fixed.train()
    torch.testing.assert_close(m_fixed(rays)[-1][0], a)


def test_density_noise_is_gaussian(monkeypatch):
    """The noise on raw density is a standard normal draw times density_noise."""
    calls = []
    real = torch.randn_like

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(torch, 'randn_like', spy)
    m = MipNeRF(ModelArgs(num_samples=256, density_noise=1.0))
    m.train()
    m(make_rays((256,)))
    assert len(calls) == 2  # one draw per level
    noise = torch.cat([c.flatten() for c in calls])
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    calls.clear()
    m.eval()
    m(make_rays((4,)))
    assert not calls


def test_forward_any_batch_shape_and_levels():
    m = MipNeRF(ModelArgs(num_samples=8, num_levels=3))
    out = m(make_rays((2, 3)))
    assert len(out) == 3
    for rgb, dist, acc in out:
        assert rgb.shape == (2, 3, 3) and dist.shape == (2, 3) and acc.shape == (2, 3)


def test_gradients_reach_every_parameter_and_not_the_resampling(monkeypatch):
    """The fine level's loss reaches every parameter, but not through the resampling: the fine
    endpoints carry no graph and the gradient of the fine colour w.r.t. the coarse weights that
    placed them is None. With stop_level_grad=False the same probe finds a non-zero gradient."""
    import ray_utils

    real, seen = ray_utils.resample_along_rays, {}

    def spy(origins, directions, radii, t_vals, weights, *args, **kwargs):
        out = real(origins, directions, radii, t_vals, weights, *args, **kwargs)
        seen['weights'], seen['t_vals'] = weights, out[0]
        return out

    monkeypatch.setattr(ray_utils, 'resample_along_rays', spy)
    for stop in (True, False):
        torch.manual_seed(0)
        seen.clear()
        m = MipNeRF(ModelArgs(num_samples=16, stop_level_grad=stop))
        out = m(make_rays((32,)))
        assert 'weights' in seen, 'the fine level was not placed by ray_utils.resample_along_rays'
        assert seen['weights'].requires_grad  # the coarse weights depend on the parameters
        fine = out[-1][0].sum()  # the fine level only
        (g_w,) = torch.autograd.grad(fine, seen['weights'], retain_graph=True, allow_unused=True)
        if stop:
            assert not seen['t_vals'].requires_grad and g_w is None
            fine.backward()
            for name, p in m.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
        else:
            assert seen['t_vals'].requires_grad and g_w is not None and g_w.abs().max() > 0


def test_render_image_is_chunk_invariant_and_restores_mode():
    torch.manual_seed(0)
    m = MipNeRF(ModelArgs(num_samples=16))
    m.train()
    rays = make_rays((6, 7))
    rgb, dist, acc = m.render_image(rays, chunk=5)
    rgb2, dist2, acc2 = m.render_image(rays, chunk=1000)
    assert rgb.shape == (6, 7, 3) and dist.shape == (6, 7) and acc.shape == (6, 7)
    torch.testing.assert_close(rgb, rgb2)
    torch.testing.assert_close(dist, dist2)
    assert m.training and not rgb.requires_grad
    m.eval()
    torch.testing.assert_close(m(make_rays((6, 7)))[-1][0], rgb)


@needs_cuda
def test_cuda_matches_cpu():
    device = torch.device('cuda')
    torch.manual_seed(0)
    m = MipNeRF(ModelArgs(num_samples=32)).eval()
    rays = make_rays((128,))
    ref = m(rays)[-1]
    out = m.to(device)(Rays(*(r.to(device) for r in rays)))[-1]
    for a, b in zip(ref, out):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)
