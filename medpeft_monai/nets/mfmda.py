"""MFM-DA (seed 003): the pieces of stage 1b that are networks.

* :class:`FrozenImageEncoder`: the fixed image encoder ``f(.)`` of the direction-consistency and style
  losses (the paper uses CLIP ViT-B/32 and VGG16, neither offline here; any fixed encoder works, and the
  default is the offline LiteMedSAM TinyViT). Inputs are diffusion-space images in ``[-1, 1]``.
* :class:`InstanceAwareAdaptor`: the dynamic instance-aware adaptor,
  ``Delta = g * Delta_dynamic + (1 - g) * Delta_static`` with ``Delta_static = mean f(target) - mean f(source)``,
  ``Delta_dynamic = MLP(f_src - mu_target)`` and ``g = sigmoid(MLP_gate(f_src))`` (last bias -5: ``g`` about
  0.007 at the start, so adaptation begins along the static direction).

The diffusion model itself is MONAI's ``DiffusionModelUNet``; the losses are in :mod:`medpeft_monai.losses`
and the loops in :mod:`medpeft_monai.engines.mfmda`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone

__all__ = ["FrozenImageEncoder", "InstanceAwareAdaptor"]


class FrozenImageEncoder(nn.Module):
    """``f(.)``: a frozen foundation encoder giving a pooled embedding and a few feature maps.

    Args:
        backbone, weights, image_size, model_kwargs: as for :class:`~medpeft_monai.backbones.FrozenBackbone`
            (3 input channels).
        style_levels: block indices whose NCHW outputs feed the Gram (style) loss; default the first two
            quarters of the blocks.

    :meth:`forward` takes ``(B, 3, H, W)`` images in ``[-1, 1]`` and returns ``(embedding (B, D), levels)``;
    gradients flow to the input (the encoder's own parameters never train).
    """

    def __init__(self, backbone: str = "tiny_vit_5m_224", weights: str | os.PathLike | None = "litemedsam",
                 image_size: int | Sequence[int] = 64, style_levels: Sequence[int] | None = None,
                 model_kwargs: dict | None = None) -> None:
        super().__init__()
        self.encoder = FrozenBackbone(backbone, weights=weights, image_size=image_size, in_chans=3,
                                      model_kwargs=model_kwargs)
        self.encoder.requires_grad_(False)
        n = len(self.encoder.blocks)
        picks = style_levels if style_levels is not None else (max(n // 4 - 1, 0), max(n // 2 - 1, 0))
        self.style_levels = sorted({int(i) % n for i in picks})
        self.eval()

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        """Always in eval mode: the encoder is a fixed measuring device."""
        return super().train(False)

    @property
    def dim(self) -> int:
        return self.encoder.num_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.encoder.encode((x.clamp(-1, 1) + 1) / 2, levels=self.style_levels)
        return self.encoder.pool(out.tokens), out.levels


class InstanceAwareAdaptor(nn.Module):
    """The dynamic instance-aware adaptor (seed 003, stage 1b).

    ``Delta(f_src) = g * tanh-MLP(f_src - mu_target) + (1 - g) * Delta_static``, ``g = sigmoid(MLP_gate(f_src))``.

    Args:
        dim: embedding size ``D`` of the frozen encoder.
        hidden: hidden width of the dynamic MLP (``4 D`` by default, as 512 -> 2048 -> 512 in the paper).
        gate_bias: initial bias of the gate's last layer (-5: ``g`` about 0.007).
        dynamic: ``False`` gives the static-direction-only ablation (``Delta = Delta_static``).

    ``static_direction`` and ``target_mean`` are buffers set once by :meth:`set_directions` from the frozen
    encoder's embeddings of the source and target images.
    """

    def __init__(self, dim: int, hidden: int | None = None, gate_bias: float = -5.0, dynamic: bool = True) -> None:
        super().__init__()
        if not isinstance(dynamic, bool):
            raise TypeError(f"dynamic must be True or False, got {dynamic!r}; on a bundle command line write "
                            "--dynamic False.")
        hidden = int(hidden or 4 * dim)
        self.dynamic = dynamic
        self.direction = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.gate = nn.Sequential(nn.Linear(dim, dim // 4), nn.Tanh(), nn.Linear(dim // 4, 1))
        nn.init.constant_(self.gate[-1].bias, float(gate_bias))
        self.register_buffer("static_direction", torch.zeros(dim))
        self.register_buffer("target_mean", torch.zeros(dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def set_directions(self, source_embeddings: torch.Tensor, target_embeddings: torch.Tensor) -> None:
        """``Delta_static = mean f(target) - mean f(source)``; ``mu_target = mean f(target)``."""
        self.target_mean.copy_(target_embeddings.mean(0))
        self.static_direction.copy_(self.target_mean - source_embeddings.mean(0))
        self.initialised.fill_(True)

    def gate_value(self, source_embedding: torch.Tensor) -> torch.Tensor:
        """``g`` per image, ``(B, 1)``."""
        return torch.sigmoid(self.gate(source_embedding))

    def forward(self, source_embedding: torch.Tensor) -> torch.Tensor:
        """``Delta`` per image, ``(B, D)``."""
        if not bool(self.initialised):
            raise RuntimeError("InstanceAwareAdaptor.set_directions(source, target) must run before the adaptor "
                               "is used (TargetAdaptationTrainer does it when training starts).")
        static = self.static_direction.expand_as(source_embedding)
        if not self.dynamic:
            return static
        g = self.gate_value(source_embedding)
        return g * self.direction(source_embedding - self.target_mean) + (1 - g) * static
