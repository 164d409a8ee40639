"""The mip-NeRF 360 model: architecture as 360.gin, sampling, losses and their gradients."""

import dataclasses

import pytest
import torch

import runs
import stepfun
import train_utils
from config import ModelArgs
from model360 import MipNeRF360, loss360
from ray_utils import Rays, compute_alpha_weights

# configs/360.txt's network, and a small one for speed.
FULL = dict(
    model='mipnerf360',
    num_levels=3,
    num_samples=32,
    net_width=1024,
    bottleneck_width=256,
    max_deg_point=12,
    resample_padding=0.0,
    init='he',
    opaque_background=True,
    white_bkgd=False,
)
SMALL = dict(
    FULL,
    net_width=32,
    net_depth=2,
    skip_layer=1,
    bottleneck_width=16,
    net_width_condition=16,
    prop_net_width=16,
    prop_net_depth=2,
    num_prop_samples=16,
    num_samples=8,
)


def unbounded_rays(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(n, 3, generator=gen) * 0.1
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    ones = torch.ones(n, 1)
    return Rays(o, d, d, ones * 1e-3, ones, ones * 0.2, ones * 1e6)


def test_architecture_matches_360_gin():
    m = MipNeRF360(ModelArgs(**FULL))
    k = m.basis.shape[-1]
    assert k == 21  # the icosahedron tessellated twice, antipodes removed (multinerf's geopoly)
    x_dim, view = 2 * k * 12, 3 + 2 * 3 * 4
    assert [layer.in_features for layer in m.prop_mlp.trunk] == [x_dim, 256, 256, 256]
    assert not m.prop_mlp.has_rgb and not hasattr(m.prop_mlp, 'bottleneck')  # density only
    assert [layer.in_features for layer in m.mlp.trunk] == [x_dim] + [1024] * 4 + [1024 + x_dim] + [1024] * 2
    assert (m.mlp.bottleneck.out_features, m.mlp.condition[0].in_features) == (256, 256 + view)
    assert (m.mlp.condition[0].out_features, m.mlp.rgb.in_features) == (128, 128)
    w = m.mlp.trunk[1].weight.detach()  # He-uniform: U(-sqrt(6 / fan_in), sqrt(6 / fan_in))
    assert w.abs().max() <= (6 / 1024) ** 0.5 and float(w.std()) == pytest.approx((2 / 1024) ** 0.5, rel=0.05)


def test_rendering_shapes_opaque_background_and_determinism():
    torch.manual_seed(0)
    m = MipNeRF360(ModelArgs(**SMALL)).eval()
    rays = unbounded_rays(64)
    with torch.no_grad():
        levels, history = m(rays, history=True)
        again = m(rays)
    assert len(levels) == 3 and len(history) == 3
    for (rgb, distance, acc), (sdist, w), n in zip(levels, history, (16, 16, 8)):
        assert rgb.shape == (64, 3) and distance.shape == acc.shape == (64,)
        assert sdist.shape == (64, n + 1) and w.shape == (64, n)
        assert (sdist[:, 1:] >= sdist[:, :-1]).all() and sdist.min() >= 0 and sdist.max() <= 1
        torch.testing.assert_close(acc, torch.ones(64))  # the last interval is opaque
        assert ((distance >= 0.2) & (distance <= 1e6)).all()
    for a, b in zip(levels[-1], again[-1]):
        torch.testing.assert_close(a, b)  # evaluation is deterministic
    m.train()
    with torch.no_grad():
        jittered = m(rays, history=True)[1][-1][0]
    assert not torch.equal(jittered, history[-1][0])  # training jitters


def test_alpha_weights_against_a_loop():
    torch.manual_seed(1)
    t = torch.sort(torch.rand(5, 9) * 4, -1).values
    density, dirs = torch.rand(5, 8) * 3, torch.randn(5, 3)
    w = compute_alpha_weights(density, t, dirs, opaque_background=True)
    norm = dirs.norm(dim=-1)
    for r in range(5):
        trans = 1.0
        for i in range(8):
            alpha = 1.0 if i == 7 else 1 - torch.exp(-density[r, i] * (t[r, i + 1] - t[r, i]) * norm[r])
            assert w[r, i] == pytest.approx(float(trans * alpha), abs=1e-6)
            trans = trans * (1 - alpha)


def test_losses_reach_the_right_networks():
    """The interlevel loss trains the proposal MLP only; the data and distortion losses the NeRF MLP
    only (no gradient crosses levels: the sampled intervals are detached)."""
    torch.manual_seed(0)
    m = MipNeRF360(ModelArgs(**SMALL)).train()
    rays, target = unbounded_rays(128), torch.rand(128, 3)
    levels, history = m(rays, train_frac=0.5, history=True)
    assert all(not s.requires_grad for s, _ in history)
    c, w = history[-1]
    interlevel = sum(stepfun.lossfun_outer(c.detach(), w.detach(), cp, wp).mean() for cp, wp in history[:-1])
    interlevel.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in m.mlp.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.prop_mlp.parameters())
    m.zero_grad(set_to_none=True)
    loss, mse = loss360(levels, history, target, torch.ones(128, 1), 0.001, 0.0, 0.01)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.prop_mlp.parameters())
    assert all(torch.isfinite(p.grad).all() for p in m.mlp.parameters() if p.grad is not None)
    assert float(mse.detach()) == pytest.approx(float(((levels[-1][0].detach() - target) ** 2).mean()), rel=1e-5)


def test_each_mlp_is_clipped_on_its_own():
    """multinerf clips the proposal and NeRF MLPs' gradients separately: a small proposal gradient
    keeps its size beside a large NeRF one, and each large one ends at the bound."""
    m = MipNeRF360(ModelArgs(**SMALL))
    for scale, mlp in ((1e-4, m.prop_mlp), (3.0, m.mlp)):
        params = list(mlp.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
        for p in params:
            p.grad *= scale / norm

    def norm(mlp):
        return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in mlp.parameters()])))

    total = train_utils.clip_gradients(m, 1e-3)
    assert float(total) == pytest.approx((1e-8 + 9.0) ** 0.5, rel=1e-5)
    assert norm(m.prop_mlp) == pytest.approx(1e-4, rel=1e-5)
    assert norm(m.mlp) == pytest.approx(1e-3, rel=1e-5)
    train_utils.clip_gradients(m, 0.0)  # off
    assert norm(m.mlp) == pytest.approx(1e-3, rel=1e-5)


def test_charbonnier_data_term():
    rgb = torch.rand(10, 3, requires_grad=True)
    target = torch.rand(10, 3)
    levels = [(rgb, None, None)]
    hist = [(torch.linspace(0, 1, 3).expand(10, 3), torch.full((10, 2), 0.5))]
    loss, _ = loss360(levels, hist, target, torch.ones(10, 1), 0.001, 1.0, 0.0)
    assert float(loss.detach()) == pytest.approx(
        float(torch.sqrt((rgb.detach() - target) ** 2 + 1e-6).mean()), rel=1e-6
    )


def test_checkpoints_rebuild_the_360_model(tmp_path):
    args = ModelArgs(**SMALL)
    m = runs.make_model(args)
    assert isinstance(m, MipNeRF360)
    ckpt = {'model_args': dataclasses.asdict(args), 'model': m.state_dict(), 'path': 'x'}
    again = runs.load_model(ckpt)
    for (k, a), (k2, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
