"""Losses and image metrics."""

import http.client
import math
import os
import traceback
import warnings

import torch


def mse_to_psnr(mse):
    """PSNR in dB of a mean squared error, for images with maximum value 1."""
    if torch.is_tensor(mse):
        return -10.0 * torch.log10(mse)
    return -10.0 * math.log10(mse)


def weighted_mean(values, lossmult):
    """sum(lossmult * values) / sum(lossmult), lossmult `[..., 1]` broadcast over values `[..., C]`."""
    lossmult = torch.broadcast_to(lossmult, values.shape)
    return (lossmult * values).sum() / lossmult.sum()


def weighted_mse(rgb, target, lossmult):
    """sum(lossmult * (rgb - target)^2) / sum(lossmult * 3), as the official release.

    Args:
      rgb, target: `[..., 3]`; lossmult: `[..., 1]` per-ray weights (the pixel
        area ratio for multiscale data, ones otherwise).
    """
    return weighted_mean((rgb - target) ** 2, lossmult)


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
    return [coarse_loss_mult] * (num_levels - 1) + [1.0]


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
    return float(
        structural_similarity(
            a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )


class LPIPS:
    """LPIPS (VGG, v0.1, the official eval's net-lin_vgg_v0.1) through the `lpips` package, when it loads.

    `available` tells whether it did; `note` says why not otherwise, in one line with the fix:
    the package missing, torchvision not matching torch, or the VGG16 ImageNet weights (which
    torchvision downloads once into torch's hub cache) not downloadable.
    """

    # torchvision's VGG16_Weights.IMAGENET1K_V1, which lpips loads; lpips ships its own linear layers.
    VGG_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
    VGG_MB = 528
    INSTALL = 'pip install -r requirements-eval.txt'

    def __init__(self, device='cpu'):
        self.fn, self.note = None, ''
        stage = 'import'
        try:
            import lpips  # imports torchvision

            stage = 'build'
            with warnings.catch_warnings():  # lpips calls torchvision's legacy `pretrained=True`
                warnings.filterwarnings('ignore', message=r'.*(pretrained|weights).* deprecated', category=UserWarning)
                self.fn = lpips.LPIPS(net='vgg', version='0.1', verbose=False).to(device).eval()
        except Exception as e:  # not installed, torchvision broken, or weights not downloadable
            self.note = self.skip_note(e, stage)
        self.device = device

    @classmethod
    def vgg_cache_path(cls):
        """Where torchvision keeps (and looks for) the VGG16 weights: torch.hub's checkpoints folder."""
        return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(cls.VGG_URL))

    @classmethod
    def skip_note(cls, e, stage):
        """The one-line note for an LPIPS that failed to load with `e` at `stage` ('import' or 'build')."""
        error = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'.rstrip(': ')
        if isinstance(e, ModuleNotFoundError) and (e.name or '').split('.')[0] in ('lpips', 'torchvision'):
            return (
                f'LPIPS skipped: the {e.name.split(".")[0]} package is not installed ({cls.INSTALL}; '
                f'its VGG16 weights, about {cls.VGG_MB} MB, then download once on first use)'
            )
        in_torchvision = any(
            f'{os.sep}torchvision{os.sep}' in frame.filename for frame in traceback.extract_tb(e.__traceback__)
        )
        if stage == 'import' and (in_torchvision or 'torchvision' in str(e)):
            return (
                f'LPIPS skipped: torchvision does not load with torch {torch.__version__} ({error}); install '
                f'the torchvision built for this torch, from the index torch came from (see requirements-eval.txt)'
            )
        offline = isinstance(e, (OSError, http.client.HTTPException)) and not os.path.exists(cls.vgg_cache_path())
        if stage == 'build' and offline:
            return (
                f'LPIPS skipped: its VGG16 weights could not be downloaded ({error}); '
                f'put {cls.VGG_URL} ({cls.VGG_MB} MB) at {cls.vgg_cache_path()} '
                f'(torch.hub cache: $TORCH_HOME/hub, default ~/.cache/torch/hub)'
            )
        return f'LPIPS skipped: {error}'

    @property
    def available(self):
        return self.fn is not None

    @torch.no_grad()
    def __call__(self, img0, img1):

        def to(x):
            return x.float().to(self.device).permute(2, 0, 1)[None] * 2 - 1

        return float(self.fn(to(img0), to(img1)))


def average_error(psnr, ssim_value, lpips_value):
    """The paper's 'average error' from mean PSNR, SSIM and LPIPS, as the official summarize.ipynb:

    the geometric mean of MSE = 10^(-PSNR/10) (the MSE of the mean PSNR),
    sqrt(1 - SSIM) and LPIPS.
    """
    mse = 10.0 ** (-psnr / 10.0)
    return math.exp((math.log(mse) + math.log(math.sqrt(max(1 - ssim_value, 1e-12))) + math.log(lpips_value)) / 3)
