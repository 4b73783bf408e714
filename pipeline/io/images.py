"""Image grids and PNG encoding: one tiling function and one encoder for every image the project writes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch


def tile(images01: torch.Tensor | np.ndarray, cols: int = 8, scale: int = 4, pad: int = 1,
         pad_value: float = 0.5, ink_black: bool = False) -> np.ndarray:
    """Tile images into one uint8 array with `pad`-pixel gaps, each upscaled `scale`x (nearest).

    Args:
        images01: [N, C, H, W] in [0, 1] (clipped here).
        cols: images per row.
        pad_value: grey level of the gaps, in [0, 1] (mid grey separates both ink and background).
        ink_black: show high values dark (digits look like ink on paper).
    Returns:
        uint8 [rows*(H*scale+pad)+pad, cols*(W*scale+pad)+pad] for C = 1, with a trailing C axis otherwise.
    """
    x = torch.as_tensor(images01).detach().float().cpu().clamp(0, 1).numpy()
    if ink_black:
        x = 1.0 - x
    n, c, h, w = x.shape
    rows = max(1, math.ceil(n / cols))
    H, W = h * scale + pad, w * scale + pad
    grid = np.full((rows * H + pad, cols * W + pad, c), pad_value, dtype=np.float32)
    for k in range(n):
        r, q = divmod(k, cols)
        big = x[k].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        grid[pad + r * H : pad + r * H + h * scale, pad + q * W : pad + q * W + w * scale] = big
    out = (grid * 255).round().astype(np.uint8)
    return out[..., 0] if c == 1 else out


def hwc(img_chw: np.ndarray) -> np.ndarray:
    """One image [C, H, W] (C = 1 grey or 3 RGB) in the layout PIL reads: [H, W] or [H, W, 3]."""
    return img_chw[0] if img_chw.shape[0] == 1 else img_chw.transpose(1, 2, 0)


def png_bytes(array_u8: np.ndarray) -> bytes:
    """Encode a uint8 [H, W] or [H, W, 3] array as PNG (see `hwc` for [C, H, W] images)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array_u8)).save(buf, format="PNG")
    return buf.getvalue()
