"""Pixel CNN encoder and decoder of the ResTok tokenizer (MaskGIT-VQGAN layout, no attention).

docs/method.md, tokenizer §2.2 (encoder) and §4.8 (decoder). Ported in structure from TiTok's
`maskgit_vqgan.py` (https://github.com/bytedance/1d-tokenizer). One resolution stage per entry of
`channels`; each stage but the last halves (encoder: 2x2 average pool) or doubles (decoder: nearest
upsample + 3x3 conv) the resolution, so the overall factor is 2^(len(channels) - 1). The paper's plan
(128, 128, 256, 256, 512) gives 16x. GroupNorm uses 32 groups, so every channel count is a multiple of 32.
Every 3x3 conv is stride 1 with padding 1 ("same").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from restok.models.recompute import call


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GN-SiLU-Conv3x3 twice. With in != out the shortcut is a 1x1 conv of the block's *output* h, not of its
    input (output = h + W h): a quirk of the TiTok port that the official weights depend on (docs/method.md, restok §4 #11)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.carries_input = in_channels == out_channels
        self.shortcut = nn.Identity() if self.carries_input else nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return h + (x if self.carries_input else self.shortcut(h))


def _res_stack(in_channels: int, out_channels: int, num_blocks: int) -> list[nn.Module]:
    return [ResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)]


def _run(layers: nn.Sequential, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """layers(x), each ResBlock under activation checkpointing when `checkpointed` (restok.models.recompute)."""
    for layer in layers:
        x = call(layer, x, checkpointed=checkpointed and isinstance(layer, ResBlock))
    return x


class PixelEncoder(nn.Module):
    """Image (B, 3, H, W) -> features (B, z_channels, H / f, W / f), f = 2^(len(channels) - 1).

    Args:
        channels: output channels of each resolution stage, finest first.
        num_res_blocks: ResBlocks per stage (and in the middle).
        z_channels: output channels.
    """

    def __init__(self, channels: Sequence[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1, bias=False)]
        prev = channels[0]
        for i, ch in enumerate(channels):
            layers += _res_stack(prev, ch, num_res_blocks)
            if i < len(channels) - 1:
                layers.append(nn.AvgPool2d(2))
            prev = ch
        layers += _res_stack(prev, prev, num_res_blocks)  # middle
        layers += [_norm(prev), nn.SiLU(), nn.Conv2d(prev, z_channels, 1)]
        self.layers = nn.Sequential(*layers)
        self.checkpointing = False  # set by ResTok.set_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.layers, x, self.checkpointing)


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, 3, h * f, w * f), no output activation.

    Args mirror PixelEncoder; the stages run coarsest first (channels read from the end).
    """

    def __init__(self, channels: Sequence[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        prev = channels[-1]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, prev, 3, padding=1)]
        layers += _res_stack(prev, prev, num_res_blocks)  # middle
        for i in reversed(range(len(channels))):
            layers += _res_stack(prev, channels[i], num_res_blocks)
            prev = channels[i]
            if i > 0:
                layers.append(Upsample(prev))
        layers += [_norm(prev), nn.SiLU(), nn.Conv2d(prev, 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)
        self.checkpointing = False  # set by ResTok.set_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.layers, x, self.checkpointing)
