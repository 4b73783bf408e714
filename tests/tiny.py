"""The one tiny test network: a random diffusers UNet2DModel on 8x8 single-channel images.

Widths (32, 64), one layer per block: ~0.65 M parameters, one forward at batch 256 in ~0.06 s on a CPU core.
Tests import it (`from tiny import tiny_unet`) instead of each building its own copy.
"""

from __future__ import annotations

import torch


def tiny_unet(*, in_channels: int = 1, out_channels: int = 1, seed: int = 0, attention: bool = False,
              out_scale: float | None = None):
    """A random `UNet2DModel` (8x8), seeded, in eval mode.

    Args:
        attention: an attention block in the second level (exercises the attention kernels too).
        out_scale: multiply the last conv's weights by this: a random init outputs eps ~0.01, and a
            comparison of two samplers on near-zero eps would mean little.
    """
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    down, up = (("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")) if attention else \
        (("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D"))
    unet = UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=out_channels, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=8)
    if out_scale is not None:
        with torch.no_grad():
            unet.conv_out.weight.mul_(out_scale)
    return unet.eval()
