"""Losses and image metrics."""
import math

import torch


def mse_to_psnr(mse):
    """PSNR in dB of a mean squared error, for images with maximum value 1."""
    if torch.is_tensor(mse):
        return -10. * torch.log10(mse)
    return -10. * math.log10(mse)


def weighted_mse(rgb, target, lossmult):
    """sum(lossmult * (rgb - target)^2) / sum(lossmult * 3), as the official release.

    Args:
      rgb, target: `[..., 3]`; lossmult: `[..., 1]` per-ray weights (the pixel
        area ratio for multiscale data, ones otherwise).
    """
    lossmult = torch.broadcast_to(lossmult, rgb.shape)
    return (lossmult * (rgb - target) ** 2).sum() / lossmult.sum()


def mipnerf_loss(levels, target, lossmult, coarse_loss_mult=0.1):
    """The training loss: coarse levels weighted by `coarse_loss_mult`, then the fine one.

    Args:
      levels: per-level outputs [(rgb `[..., 3]`, distance, acc), ...], coarse first.
      target: `[..., 3]` ground-truth colours; lossmult: `[..., 1]`.

    Returns:
      loss (scalar tensor), per-level MSEs `[L]` (detached), per-level PSNRs `[L]`.
    """
    mses = torch.stack([weighted_mse(rgb, target, lossmult) for rgb, *_ in levels])
    loss = coarse_loss_mult * mses[:-1].sum() + mses[-1]
    mses = mses.detach()
    return loss, mses, mse_to_psnr(mses)
