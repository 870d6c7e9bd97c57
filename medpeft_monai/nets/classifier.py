"""Image classifier: frozen backbone + a PEFT method + a linear head."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from medpeft_monai.backbones import BackboneOutput, FrozenBackbone, FrozenPrefix, as_plain_tensor, resolve_backbone
from medpeft_monai.peft import PeftConfig, apply_peft

__all__ = ["PeftClassifier"]


class PeftClassifier(nn.Module):
    """``logits = Head(pool(Backbone_peft(x)))``.

    Args:
        backbone: timm model name (see :class:`~medpeft_monai.backbones.FrozenBackbone`), or a built
            ``FrozenBackbone`` (used as it is; see :func:`~medpeft_monai.backbones.resolve_backbone`).
        num_classes: number of output classes.
        peft: method name or config dict, e.g. ``{"method": "lora", "rank": 8}``; default linear probing.
            It is the model's adapter ``"default"``, which also owns the head (trained and saved with it).
        weights: ``None``, ``"hub"``, ``"litemedsam"`` or a local weights file for the backbone.
        image_size: input side or ``(H, W)``.
        in_chans: input channels.
        dropout: dropout before the head.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"depth": 2}`` for tiny tests).
        input_norm: the backbone's input normalisation (default: the weights' own mean/std; inputs in
            ``[0, 1]``), see :class:`~medpeft_monai.backbones.FrozenBackbone`.

    Input ``(B, in_chans, H, W)``; output ``(B, num_classes)``.
    """

    def __init__(
        self,
        backbone: str | FrozenBackbone,
        num_classes: int,
        peft: str | dict | PeftConfig | None = None,
        weights: str | os.PathLike | None = None,
        image_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        dropout: float = 0.0,
        model_kwargs: dict | None = None,
        input_norm: str | Sequence | None = "auto",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.backbone = resolve_backbone(backbone, weights=weights, image_size=image_size, in_chans=in_chans,
                                         model_kwargs=model_kwargs, input_norm=input_norm)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.num_features, num_classes))
        self.peft_config = apply_peft(self, peft, modules=("head",))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, BackboneOutput]:
        """``(logits, backbone output)`` in one pass."""
        out = self.backbone.encode(as_plain_tensor(x))
        return self.head(self.backbone.pool(out.tokens)), out

    def forward_prefix(self, prefix: FrozenPrefix) -> torch.Tensor:
        """Logits from the images' :meth:`~medpeft_monai.backbones.FrozenBackbone.frozen_prefix`."""
        return self.head(self.backbone.pool(self.backbone.encode_from(prefix).tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]
