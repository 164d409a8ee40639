"""Image helpers: float images to bytes, depth and normals to colours, PNG encoding.

Images are float `[H, W, C]` in [0, 1] (tensors or arrays); outputs are
uint8 numpy arrays, RGB, channels last.
"""

import cv2
import numpy as np
import torch


def as_numpy(x):
    """A tensor (any device or dtype) or array-like as a float32 numpy array."""
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def to_uint8(img):
    """Float image in [0, 1] (tensor or array) -> uint8 array."""
    return (np.clip(as_numpy(img), 0, 1) * 255 + 0.5).astype(np.uint8)


def colorize_depth(distance, near, far, acc=None):
    """Distance `[H, W]` -> RGB uint8 `[H, W, 3]`, turbo colour map from near to far.

    With the opacity `acc`, the colours are composited over white, so empty
    space (whose expected distance means nothing) shows as background. For
    unbounded scenes (far > 100 near) the map is linear in disparity, from
    1/near to 1/far, as mip-NeRF 360 spaces its samples.
    """
    d = as_numpy(distance)
    if far > 100 * near > 0:
        t = np.clip((1 / near - 1 / np.maximum(d, near)) / (1 / near - 1 / far), 0, 1)
    else:
        t = np.clip((d - near) / max(far - near, 1e-8), 0, 1)
    bgr = cv2.applyColorMap((t * 255 + 0.5).astype(np.uint8), cv2.COLORMAP_TURBO)
    rgb = bgr[..., ::-1].astype(np.float32) / 255
    if acc is not None:
        a = np.clip(as_numpy(acc), 0, 1)[..., None]
        rgb = rgb * a + (1 - a)
    return to_uint8(rgb)


def normals_to_rgb(normals, acc):
    """Composited normals `[H, W, 3]` (sum of w n) and opacity `[H, W]` -> colours (n + 1) / 2 over white."""
    return (normals + acc[..., None]) / 2 + (1 - acc[..., None])


def encode_png(img_uint8):
    """A uint8 RGB `[H, W, 3]` or grey `[H, W]` image as PNG bytes."""
    ok, buf = cv2.imencode('.png', img_uint8[..., ::-1] if img_uint8.ndim == 3 else img_uint8)
    if not ok:
        raise ValueError(f'PNG encoding failed for an image of shape {img_uint8.shape}')
    return buf.tobytes()
