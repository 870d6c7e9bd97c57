"""Decoders shared by the segmentation networks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LevelDecoder"]


def _conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.GroupNorm(min(8, cout), cout), nn.GELU())


class LevelDecoder(nn.Module):
    """A light multi-level decoder: full-resolution logits from a few NCHW feature levels.

    Every level ``f_i`` (``(B, C_i, h_i, w_i)``) goes through a 1x1 projection to ``D`` channels and is
    resized to the finest level; the sum is refined by a 3x3 conv and upsampled by 2 in steps (conv 3x3 +
    GroupNorm + GELU, halving the width down to ``D / 4``) until it covers the input size, where a 1x1
    conv gives the class logits (resized to the exact input size).

    Args:
        widths: channels ``C_i`` of the levels, in the order they are given to :meth:`forward`.
        finest_stride: input size / size of the finest level (sets the number of upsampling steps).
        num_classes: output channels.
        channels: ``D``.
    """

    def __init__(self, widths: Sequence[int], finest_stride: int, num_classes: int, channels: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths)
        self.fuse = _conv_norm_act(channels, channels)
        ups, ch = [], channels
        for _ in range(int(math.ceil(math.log2(max(int(finest_stride), 1))))):
            nxt = max(channels // 4, ch // 2)
            ups.append(_conv_norm_act(ch, nxt))
            ch = nxt
        self.up = nn.ModuleList(ups)
        self.classifier = nn.Conv2d(ch, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """``feats``: the levels; ``size``: ``(H, W)`` of the input. Returns ``(B, num_classes, H, W)`` logits."""
        size = tuple(int(s) for s in size)
        # NHWC activations: the CPU's (oneDNN) convolutions run this decoder ~1.5x faster forward and backward
        # than on NCHW (same result up to float rounding); the logits are returned in the usual NCHW layout
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        target = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        y = sum(F.interpolate(lat(f), size=target, mode="bilinear", align_corners=False) if f.shape[-2:] != target
                else lat(f) for lat, f in zip(self.lateral, feats))
        y = self.fuse(y)
        for block in self.up:
            y = block(F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False))
        y = self.classifier(y)
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y.contiguous()
