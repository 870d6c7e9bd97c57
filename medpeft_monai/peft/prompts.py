"""Visual Prompt Tuning (Jia et al. 2022), shallow and deep, for ViT-family backbones.

``P`` learnable prompt tokens are placed right after the prefix (class/register) tokens:
``[prefix, prompts, patches]``.

* VPT-shallow: prompts enter before the first selected block and travel through the following
  blocks like ordinary tokens.
* VPT-deep: every selected block gets its own fresh prompts; the prompts a block outputs are dropped.

Each wrapped block removes the prompt tokens from its output again, so between blocks (and in the
multi-level features a dense head reads) the token layout is exactly the backbone's. Shallow mode
carries the prompt outputs to the next wrapped block through a small shared state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone
from medpeft_monai.peft.core import PeftConfig, PeftError, PeftModule, register_method, select_blocks

__all__ = ["PromptedBlock", "VPTConfig"]


class _Carry:
    """Prompt tokens handed from one shallow-VPT block to the next within a forward pass."""

    tokens: torch.Tensor | None = None


class PromptedBlock(PeftModule):
    """Run ``block`` on ``[prefix, prompts, patches]`` and return ``[prefix, patches]``.

    Args:
        block: the frozen transformer block (``(B, N, C)`` tokens).
        num_prefix_tokens: class/register tokens in front of the patch tokens.
        prompts: ``(P, C)`` learnable prompts inserted here, or ``None`` to re-insert the prompts
            carried from the previous block (shallow VPT).
        carry: shared state for shallow VPT; ``None`` for deep VPT.
    """

    def __init__(self, block: nn.Module, num_prefix_tokens: int, num_prompts: int,
                 prompts: nn.Parameter | None, carry: _Carry | None) -> None:
        super().__init__()
        self.block, self.p, self.num_prompts = block, int(num_prefix_tokens), int(num_prompts)
        self.prompts, self.carry = prompts, carry

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.prompts is not None:
            prompts = self.prompts.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        else:
            prompts = self.carry.tokens
            if prompts is None or prompts.shape[0] != x.shape[0]:
                raise PeftError("Shallow VPT: no prompts carried into this block; the first prompted block must run "
                                "before it in the same forward pass.")
        y = self.block(torch.cat([x[:, :self.p], prompts, x[:, self.p:]], dim=1), *args, **kwargs)
        if self.carry is not None:
            self.carry.tokens = y[:, self.p:self.p + self.num_prompts]
        return torch.cat([y[:, :self.p], y[:, self.p + self.num_prompts:]], dim=1)


@register_method
@dataclass
class VPTConfig(PeftConfig):
    """Visual Prompt Tuning.

    Args:
        num_prompts: ``P`` prompt tokens (per block for deep VPT).
        deep: VPT-deep (fresh prompts at every selected block) instead of VPT-shallow.
    """

    method: ClassVar[str] = "vpt"
    num_prompts: int = 10
    deep: bool = False

    def inject(self, backbone: FrozenBackbone) -> None:
        idx = select_blocks(backbone, self.blocks)
        if any(backbone.blocks[i].token_format != "nlc" for i in idx):
            raise PeftError(f"VPT needs a ViT-family backbone with (B, N, C) tokens; {backbone.name} is "
                            f"{backbone.family!r}.")
        if self.num_prompts < 1:
            raise PeftError(f"num_prompts must be >= 1, got {self.num_prompts}.")
        if not self.deep and idx != list(range(idx[0], idx[-1] + 1)):
            raise PeftError(f"Shallow VPT carries prompts block to block; give consecutive blocks, got {idx}.")
        carry = None if self.deep else _Carry()
        for j, i in enumerate(idx):
            info = backbone.blocks[i]
            prompts = None
            if self.deep or j == 0:
                bound = math.sqrt(6.0 / (info.width + info.grid[0] * info.grid[1]))  # uniform Xavier as in VPT
                prompts = nn.Parameter(torch.empty(self.num_prompts, info.width).uniform_(-bound, bound))
            wrapped = PromptedBlock(backbone.block_module(i), info.num_prefix_tokens, self.num_prompts, prompts, carry)
            parent, _, child = info.name.rpartition(".")
            setattr(backbone.model.get_submodule(parent), child, wrapped)
