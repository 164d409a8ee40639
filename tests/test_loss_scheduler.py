import math

import pytest
import torch

from loss import average_error, mipnerf_loss, mse_to_psnr, weighted_mse
from scheduler import Schedule, learning_rate

OFFICIAL = dict(lr_init=5e-4, lr_final=5e-6, max_steps=1_000_000, lr_delay_steps=2500, lr_delay_mult=0.01)


def test_learning_rate_start_middle_end():
    assert learning_rate(0, **OFFICIAL) == pytest.approx(5e-4 * 0.01)
    # Halfway through the warm-up the ease is sin(pi/4).
    warm = 0.01 + 0.99 * math.sin(math.pi / 4)
    assert learning_rate(1250, **OFFICIAL) == pytest.approx(warm * 5e-4 * (5e-6 / 5e-4) ** (1250 / 1e6))
    assert learning_rate(500_000, **OFFICIAL) == pytest.approx(math.sqrt(5e-4 * 5e-6))  # log-linear midpoint
    assert learning_rate(1_000_000, **OFFICIAL) == pytest.approx(5e-6)
    assert learning_rate(2_000_000, **OFFICIAL) == pytest.approx(5e-6)


def test_learning_rate_without_delay_and_monotone_after_warmup():
    assert learning_rate(0, 1e-3, 1e-5, 100) == pytest.approx(1e-3)
    assert learning_rate(50, 1e-3, 1e-5, 100) == pytest.approx(1e-4)
    lrs = [learning_rate(s, **OFFICIAL) for s in range(2500, 1_000_001, 50_000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_schedule_sets_the_pure_function_times_its_scale():
    class Cfg:
        lr_init, lr_final, max_steps, lr_delay_steps, lr_delay_mult = 1e-3, 1e-5, 40, 10, 0.1

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=Cfg.lr_init)
    schedule = Schedule(Cfg)
    for step in range(45):
        assert (
            schedule.apply(opt, step)
            == opt.param_groups[0]['lr']
            == pytest.approx(learning_rate(step, 1e-3, 1e-5, 40, 10, 0.1))
        )
    schedule.scale = 0.5
    again = Schedule(Cfg)
    again.load_state_dict(schedule.state_dict())
    assert again(20) == pytest.approx(0.5 * learning_rate(20, 1e-3, 1e-5, 40, 10, 0.1))


def test_psnr_known_values():
    assert mse_to_psnr(0.01) == pytest.approx(20.0)
    assert mse_to_psnr(1e-4) == pytest.approx(40.0)
    assert float(mse_to_psnr(torch.tensor(1.0))) == pytest.approx(0.0)


def test_average_error_reproduces_the_official_summaries():
    """The official summarize.ipynb prints these rows (mean PSNR, SSIM, LPIPS -> average error)."""
    # Blender: 33.085 | 0.9605 | 0.0425 | 0.0161.
    assert average_error(33.085, 0.9605, 0.0425) == pytest.approx(0.0161, abs=5e-5)
    # Multiscale Blender, the four scales averaged: ... | 0.0114.
    psnr = sum([32.634, 34.350, 35.505, 35.636]) / 4
    ssim = sum([0.9578, 0.9703, 0.9786, 0.9834]) / 4
    lpips = sum([0.0469, 0.0260, 0.0168, 0.0120]) / 4
    assert average_error(psnr, ssim, lpips) == pytest.approx(0.0114, abs=5e-5)


def test_weighted_mse_and_coarse_weight():
    target = torch.zeros(4, 3)
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    ones = torch.ones(4, 1)
    assert weighted_mse(rgb, target, ones).item() == pytest.approx((1 + 0.25) / 4)
    # lossmult weighs rays: a zero removes the ray from both sums.
    lm = torch.tensor([[0.0], [1.0], [4.0], [1.0]])
    assert weighted_mse(rgb, target, lm).item() == pytest.approx(4 * 0.25 / 6)
    coarse, fine = torch.full((4, 3), 0.1), torch.full((4, 3), 0.2)
    loss, mses, psnrs = mipnerf_loss([(coarse, None, None), (fine, None, None)], target, ones, 0.1)
    assert loss.item() == pytest.approx(0.1 * 0.01 + 0.04)
    torch.testing.assert_close(psnrs, mse_to_psnr(torch.tensor([0.01, 0.04])))
