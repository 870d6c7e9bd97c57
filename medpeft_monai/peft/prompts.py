"""Visual Prompt Tuning (Jia et al. 2022), shallow and deep, for ViT-family backbones.

``P`` learnable prompt tokens are placed right after the prefix (class/register) tokens:
``[prefix, prompts, patches]``.

* VPT-shallow: prompts enter before the first selected block and travel through the following
  blocks like ordinary tokens; the last selected block removes them again.
* VPT-deep: every selected block gets its own fresh prompts; the prompts a block outputs are dropped.

The prompt tokens are part of the token tensor between the blocks of a shallow span (no state is kept
on any module): the backbone's :meth:`~medpeft_monai.backbones.FrozenBackbone.to_nchw` reads the patch
tokens as the last ``H*W`` tokens, so dense heads see the backbone's grid at any depth, and after the
span the layout is exactly the backbone's again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone
from medpeft_monai.peft.core import PeftConfig, PeftError, PeftModule, register_method, replace_module, select_blocks

__all__ = ["PromptedBlock", "VPTConfig"]


class PromptedBlock(PeftModule):
    """Run ``block`` with prompt tokens: optionally insert them before it, optionally remove them after it.

    Args:
        block: the frozen transformer block (``(B, N, C)`` tokens), or a wrapper around it.
        num_prefix_tokens: class/register tokens in front of the patch tokens.
        num_prompts: ``P``.
        prompts: ``(P, C)`` learnable prompts inserted before this block, or ``None`` when the prompts
            arrive in the tokens (a later block of a shallow span).
        remove: drop the ``P`` prompt tokens from the block's output (deep VPT; the last block of a
            shallow span).
    """

    wraps = ("block",)

    def __init__(self, block: nn.Module, num_prefix_tokens: int, num_prompts: int,
                 prompts: nn.Parameter | None, remove: bool) -> None:
        super().__init__()
        self.block, self.p, self.num_prompts = block, int(num_prefix_tokens), int(num_prompts)
        self.prompts, self.remove = prompts, bool(remove)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.prompts is not None:
            prompts = self.prompts.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :self.p], prompts, x[:, self.p:]], dim=1)
        y = self.block(x, *args, **kwargs)
        if self.remove:
            y = torch.cat([y[:, :self.p], y[:, self.p + self.num_prompts:]], dim=1)
        return y


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
        for j, i in enumerate(idx):
            first, last = j == 0, j == len(idx) - 1
            if not (self.deep or first or last):
                continue  # inside a shallow span the prompts simply travel with the tokens
            info = backbone.blocks[i]
            prompts = None
            if self.deep or first:
                bound = math.sqrt(6.0 / (info.width + info.grid[0] * info.grid[1]))  # uniform Xavier as in VPT
                prompts = nn.Parameter(torch.empty(self.num_prompts, info.width).uniform_(-bound, bound))
            site = backbone.model.get_submodule(info.name)
            replace_module(backbone.model, info.name, PromptedBlock(site, info.num_prefix_tokens, self.num_prompts,
                                                                    prompts, remove=self.deep or last))
