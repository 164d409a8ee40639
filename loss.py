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
    loss = total_loss(mses, coarse_loss_mult)
    mses = mses.detach()
    return loss, mses, mse_to_psnr(mses)


def level_weights(num_levels, coarse_loss_mult=0.1):
    """Each level's weight in the training loss: coarse_loss_mult, ..., coarse_loss_mult, 1."""
    return [coarse_loss_mult] * (num_levels - 1) + [1.]


def total_loss(mses, coarse_loss_mult=0.1):
    """The training loss from the per-level MSEs `[L]`: the coarse levels weighted, plus the fine one."""
    return coarse_loss_mult * mses[:-1].sum() + mses[-1]


def ssim(img0, img1):
    """SSIM of two `[H, W, 3]` images in [0, 1], as the paper reports it.

    scikit-image's implementation with the settings of the official release
    (Gaussian window of std 1.5 truncated to 11x11, K1 = 0.01, K2 = 0.03,
    population covariances, mean over the valid region and the channels).
    """
    from skimage.metrics import structural_similarity
    a, b = (x.detach().float().cpu().numpy() if torch.is_tensor(x) else x for x in (img0, img1))
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


class LPIPS:
    """LPIPS (VGG, v0.1, the official eval's net-lin_vgg_v0.1) through the `lpips` package, when it loads.

    `available` tells whether it did; `note` says why not otherwise.
    """

    def __init__(self, device='cpu'):
        self.fn, self.note = None, ''
        try:
            import lpips
            self.fn = lpips.LPIPS(net='vgg', version='0.1', verbose=False).to(device).eval()
        except Exception as e:  # not installed, or weights not downloadable
            self.note = f'LPIPS skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'.rstrip(': ')
        self.device = device

    @property
    def available(self):
        return self.fn is not None

    @torch.no_grad()
    def __call__(self, img0, img1):
        to = lambda x: (x.float().to(self.device).permute(2, 0, 1)[None] * 2 - 1)
        return float(self.fn(to(img0), to(img1)))


def average_error(psnr, ssim_value, lpips_value):
    """The paper's 'average error' from mean PSNR, SSIM and LPIPS, as the official summarize.ipynb:

    the geometric mean of MSE = 10^(-PSNR/10) (the MSE of the mean PSNR),
    sqrt(1 - SSIM) and LPIPS.
    """
    mse = 10. ** (-psnr / 10.)
    return math.exp((math.log(mse) + math.log(math.sqrt(max(1 - ssim_value, 1e-12))) + math.log(lpips_value)) / 3)
