"""LoRA (Hu et al. 2022) on linear layers, with Q/V-only adaptation of timm's fused ``qkv``.

For a frozen ``W`` the adapted layer computes ``y = W x + (alpha / r) * B A x`` with ``A`` (r x d_in,
Kaiming-uniform) and ``B`` (d_out x r, zeros), so the output is unchanged at initialisation. On a
fused ``qkv`` projection (``d_out = 3 d``, rows ordered Q, K, V as in timm's ViT, Swin and Hiera)
only the chosen parts get a low-rank pair; the K rows of ``W`` and the K output are never touched.
Because the update is linear, :meth:`LoRALinear.merge` folds ``(alpha / r) B A`` into ``W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone
from medpeft_monai.peft.core import PeftConfig, PeftError, PeftModule, find_targets, register_method, replace_module

__all__ = ["LoRAConfig", "LoRALinear"]

QKV_PARTS = "qkv"


class LoRALinear(PeftModule):
    """A frozen ``nn.Linear`` plus low-rank updates on some of its output slices.

    Args:
        base: the frozen linear layer.
        rank: ``r``, the rank of each update.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        parts: for a fused qkv layer, which of ``"q"``, ``"k"``, ``"v"`` to adapt (e.g. ``"qv"``);
            ``None`` adapts the whole output.
        dropout: dropout on the input of the low-rank path.
    """

    mergeable = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float, parts: str | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise PeftError(f"LoRA rank must be >= 1, got {rank}.")
        self.base = base
        self.rank, self.scale = int(rank), float(alpha) / float(rank)
        d_in, d_out = base.in_features, base.out_features
        if parts is None:
            self.slices = {"all": (0, d_out)}
        else:
            if d_out % 3 or not set(parts) <= set(QKV_PARTS) or not parts:
                raise PeftError(f"parts={parts!r} needs a fused qkv layer (out_features divisible by 3) and letters "
                                f"from 'qkv'; this layer has out_features={d_out}.")
            d = d_out // 3
            self.slices = {p: (QKV_PARTS.index(p) * d, (QKV_PARTS.index(p) + 1) * d) for p in parts}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, (lo, hi) in self.slices.items():
            a = torch.empty(self.rank, d_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(hi - lo, self.rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self, key: str) -> torch.Tensor:
        """``(alpha / r) B A`` for one slice."""
        return self.scale * self.lora_B[key] @ self.lora_A[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x)
        pieces, start = [], 0
        for key, (lo, hi) in self.slices.items():
            pieces.append(y[..., start:lo])
            update = (h @ self.lora_A[key].t()) @ self.lora_B[key].t()
            pieces.append(y[..., lo:hi] + self.scale * update)
            start = hi
        pieces.append(y[..., start:])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for key, (lo, hi) in self.slices.items():
            self.base.weight[lo:hi] += self.delta_weight(key).to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for key, (lo, hi) in self.slices.items():
            self.base.weight[lo:hi] -= self.delta_weight(key).to(self.base.weight.dtype)
        self.merged = False


@register_method
@dataclass
class LoRAConfig(PeftConfig):
    """LoRA on the linear layers matching ``target`` inside the selected blocks.

    Args:
        rank: rank ``r`` of every update.
        alpha: the update is scaled by ``alpha / r``.
        target: regex on block-relative module names; default: the fused attention ``qkv``.
        qkv_parts: on a fused qkv layer, which projections to adapt (the papers' baseline: ``"qv"``,
            K untouched); ignored (whole output adapted) for layers whose name does not end in ``qkv``.
        dropout: dropout on the LoRA input.
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 8.0
    target: str = r"attn\.qkv"
    qkv_parts: str = "qv"
    dropout: float = 0.0

    def inject(self, backbone: FrozenBackbone) -> None:
        for name in find_targets(backbone, self.target, self.blocks):
            layer = backbone.model.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise PeftError(f"LoRA target {name} is a {type(layer).__name__}, not nn.Linear.")
            parts = self.qkv_parts if name.endswith("qkv") else None
            replace_module(backbone.model, name, LoRALinear(layer, self.rank, self.alpha, parts, self.dropout))
