"""Segmenter: multi-level features of a PEFT-adapted frozen backbone + a light decoder.

Decoder: every level ``f_i`` (``(B, C_i, h_i, w_i)``) goes through a 1x1 projection to ``D``
channels and is resized to the finest level; the sum is refined by a 3x3 conv and upsampled by 2 in
steps (conv 3x3 + GroupNorm + GELU, halving the width down to ``D / 4``) until it reaches the input
size, where a 1x1 conv gives the class logits.

Volumes (``spatial_dims=3``, input ``(B, C, H, W, D)``) are segmented slice by slice along the last
axis. Inputs larger than the backbone's ``image_size`` go through MONAI's
``SlidingWindowInferer(roi_size=image_size)`` (``(*image_size, n_slices)`` for volumes).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medpeft_monai.backbones import BackboneError, FrozenBackbone, as_plain_tensor
from medpeft_monai.peft import PeftConfig, apply_peft

__all__ = ["PeftSegmenter", "default_levels"]


def default_levels(num_blocks: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced block indices ending with the last block (e.g. 12 -> [2, 5, 8, 11])."""
    count = min(count, num_blocks)
    return sorted({num_blocks - 1 - round(i * num_blocks / count) for i in range(count)})


def _conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.GroupNorm(min(8, cout), cout), nn.GELU())


class PeftSegmenter(nn.Module):
    """Dense prediction with a frozen, PEFT-adapted backbone.

    Args:
        backbone: timm model name.
        num_classes: output channels (include background).
        peft: method name or config dict; default linear probing (frozen encoder, decoder trains).
        weights: ``None``, ``"hub"`` or a local weights file.
        image_size: backbone input side or ``(H, W)``; the network requires this input size.
        in_chans: input channels.
        levels: block indices whose outputs feed the decoder (default: 4 evenly spaced).
        decoder_channels: ``D``.
        spatial_dims: 2 for images, 3 for volumes segmented slice-wise.
        model_kwargs: extra ``timm.create_model`` arguments.

    Input ``(B, in_chans, H, W[, D])``; output ``(B, num_classes, H, W[, D])`` logits.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        peft: str | dict | PeftConfig | None = None,
        weights: str | os.PathLike | None = None,
        image_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        levels: Sequence[int] | None = None,
        decoder_channels: int = 64,
        spatial_dims: int = 2,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.spatial_dims = spatial_dims
        self.backbone = FrozenBackbone(backbone, weights=weights, image_size=image_size, in_chans=in_chans,
                                       model_kwargs=model_kwargs)
        self.peft_config = apply_peft(self.backbone, peft)
        n = len(self.backbone.blocks)
        self.levels = [int(i) % n for i in (levels if levels is not None else default_levels(n))]
        widths = self._level_widths()
        self.lateral = nn.ModuleList(nn.Conv2d(w, decoder_channels, 1) for w in widths)
        self.fuse = _conv_norm_act(decoder_channels, decoder_channels)
        steps = int(math.ceil(math.log2(max(self.finest_stride, 1))))
        ups, ch = [], decoder_channels
        for _ in range(steps):
            nxt = max(decoder_channels // 4, ch // 2)
            ups.append(_conv_norm_act(ch, nxt))
            ch = nxt
        self.up = nn.ModuleList(ups)
        self.classifier = nn.Conv2d(ch, num_classes, 1)

    def _level_widths(self) -> list[int]:
        """Channel width of each level, and (as ``finest_stride``) the smallest level stride."""
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            feats = self.backbone.forward_levels(torch.zeros(1, self.backbone.in_chans, *self.backbone.image_size),
                                                 self.levels)
            self.backbone.train(was)
        self.finest_stride = min(self.backbone.image_size[0] // f.shape[-2] for f in feats)
        return [f.shape[1] for f in feats]

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        if size != tuple(self.backbone.image_size):
            raise BackboneError(
                f"Input size {size} differs from the backbone's image_size {self.backbone.image_size}; use "
                f"SlidingWindowInferer(roi_size={list(self.backbone.image_size)}) or resize in preprocessing.")
        feats = self.backbone.forward_levels(x, self.levels)
        target = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        y = sum(F.interpolate(lat(f), size=target, mode="bilinear", align_corners=False) if f.shape[-2:] != target
                else lat(f) for lat, f in zip(self.lateral, feats))
        y = self.fuse(y)
        for block in self.up:
            y = block(F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False))
        y = self.classifier(y)
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_plain_tensor(x)
        if self.spatial_dims == 2:
            if x.ndim != 4:
                raise BackboneError(f"2D segmenter expects (B, C, H, W), got {tuple(x.shape)}; "
                                    "set spatial_dims=3 for volumes.")
            return self.forward_2d(x)
        if x.ndim != 5:
            raise BackboneError(f"3D segmenter expects (B, C, H, W, D), got {tuple(x.shape)}.")
        b, c, h, w, d = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        y = self.forward_2d(slices)
        return y.reshape(b, d, -1, h, w).permute(0, 2, 3, 4, 1)
