"""Segmenter: multi-level features of a PEFT-adapted frozen backbone + a light decoder.

The backbone runs once (:meth:`~medpeft_monai.backbones.FrozenBackbone.encode`) and returns the NCHW
features of the chosen blocks; :class:`~medpeft_monai.nets.decoders.LevelDecoder` turns them into
full-resolution logits.

Volumes (``spatial_dims=3``, input ``(B, C, H, W, D)``) are segmented slice by slice along the last
axis. Inputs larger than the backbone's ``image_size`` go through MONAI's
``SlidingWindowInferer(roi_size=image_size)`` (``(*image_size, n_slices)`` for volumes): the bundles'
``spatial="native"`` (see :func:`medpeft_monai.data.transforms.segmentation_transforms`); their default
``"resize"`` resizes the whole image to ``image_size`` instead.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from medpeft_monai.backbones import (
    BackboneError,
    BackboneOutput,
    FrozenBackbone,
    FrozenPrefix,
    as_plain_tensor,
    resolve_backbone,
)
from medpeft_monai.nets.decoders import LevelDecoder
from medpeft_monai.peft import PeftConfig, apply_peft

__all__ = ["PeftSegmenter", "default_levels", "level_layout"]


def default_levels(num_blocks: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced block indices ending with the last block (e.g. 12 -> [2, 5, 8, 11])."""
    count = min(count, num_blocks)
    return sorted({num_blocks - 1 - round(i * num_blocks / count) for i in range(count)})


def level_layout(backbone: FrozenBackbone, levels: Sequence[int]) -> tuple[list[tuple[int, int, int]], int]:
    """``(C, h, w)`` of each level at the backbone's image size, and the smallest level stride (one dummy pass
    in eval mode): what a decoder over these levels is built from."""
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        feats = backbone.forward_levels(torch.zeros(1, backbone.in_chans, *backbone.image_size), levels)
    backbone.train(was)
    shapes = [tuple(f.shape[1:]) for f in feats]
    return shapes, min(backbone.image_size[0] // s[1] for s in shapes)


class PeftSegmenter(nn.Module):
    """Dense prediction with a frozen, PEFT-adapted backbone.

    Args:
        backbone: timm model name, or a built :class:`~medpeft_monai.backbones.FrozenBackbone` (used as it is;
            see :func:`~medpeft_monai.backbones.resolve_backbone`).
        num_classes: output channels (include background).
        peft: method name or config dict; default linear probing (frozen encoder, decoder trains). It is
            the model's adapter ``"default"``, which also owns the decoder (trained and saved with it).
        weights: ``None``, ``"hub"``, ``"litemedsam"`` or a local weights file.
        image_size: backbone input side or ``(H, W)``; the network requires this input size.
        in_chans: input channels.
        levels: block indices whose outputs feed the decoder (default: 4 evenly spaced).
        decoder_channels: ``D``.
        spatial_dims: 2 for images, 3 for volumes segmented slice-wise.
        model_kwargs: extra ``timm.create_model`` arguments.
        input_norm: the backbone's input normalisation (default: the weights' own mean/std; inputs in
            ``[0, 1]``), see :class:`~medpeft_monai.backbones.FrozenBackbone`.

    Input ``(B, in_chans, H, W[, D])``; output ``(B, num_classes, H, W[, D])`` logits.
    """

    def __init__(
        self,
        backbone: str | FrozenBackbone,
        num_classes: int,
        peft: str | dict | PeftConfig | None = None,
        weights: str | os.PathLike | None = None,
        image_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        levels: Sequence[int] | None = None,
        decoder_channels: int = 64,
        spatial_dims: int = 2,
        model_kwargs: dict | None = None,
        input_norm: str | Sequence | None = "auto",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.spatial_dims = spatial_dims
        self.backbone = resolve_backbone(backbone, weights=weights, image_size=image_size, in_chans=in_chans,
                                         model_kwargs=model_kwargs, input_norm=input_norm)
        n = len(self.backbone.blocks)
        self.levels = sorted({int(i) % n for i in (levels if levels is not None else default_levels(n))})
        shapes, stride = level_layout(self.backbone, self.levels)
        self.decoder = LevelDecoder([c for c, _, _ in shapes], stride, num_classes, decoder_channels)
        self.peft_config = apply_peft(self, peft, modules=("decoder",))

    def encode_2d(self, x: torch.Tensor) -> tuple[torch.Tensor, BackboneOutput]:
        """``(logits, backbone output)`` of a ``(B, C, H, W)`` batch of the backbone's image size."""
        size = tuple(x.shape[-2:])
        if size != tuple(self.backbone.image_size):
            raise BackboneError(
                f"Input size {size} differs from the backbone's image_size {self.backbone.image_size}; use "
                f"SlidingWindowInferer(roi_size={list(self.backbone.image_size)}) or resize in preprocessing.")
        out = self.backbone.encode(x, levels=self.levels)
        return self.decoder(out.levels, size), out

    def forward_prefix(self, prefix: FrozenPrefix) -> torch.Tensor:
        """Logits of 2D images from their :meth:`~medpeft_monai.backbones.FrozenBackbone.frozen_prefix`
        (computed with ``levels=self.levels``): the rest of :meth:`forward_2d`."""
        out = self.backbone.encode_from(prefix, self.levels)
        return self.decoder(out.levels, tuple(self.backbone.image_size))

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_2d(x)[0]

    def _slices(self, x: torch.Tensor) -> torch.Tensor:
        """The network input as a batch of 2D images (volumes: ``(B * D, C, H, W)`` slices)."""
        x = as_plain_tensor(x)
        if self.spatial_dims == 2:
            if x.ndim != 4:
                raise BackboneError(f"2D segmenter expects (B, C, H, W), got {tuple(x.shape)}; "
                                    "set spatial_dims=3 for volumes.")
            return x
        if x.ndim != 5:
            raise BackboneError(f"3D segmenter expects (B, C, H, W, D), got {tuple(x.shape)}.")
        b, c, h, w, d = x.shape
        return x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)

    def _restack(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Slice logits ``(B * D, K, H, W)`` back to ``(B, K, H, W, D)`` for volumes."""
        if self.spatial_dims == 2:
            return y
        b, _, h, w, d = x.shape
        return y.reshape(b, d, -1, h, w).permute(0, 2, 3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._restack(self.forward_2d(self._slices(x)), x)
