"""Prompt methods: Visual Prompt Tuning (Jia et al. 2022), shallow and deep, for ViT-family backbones, and
window prompts for windowed-attention backbones (SAM2's HieraDet, TinyViT).

``P`` learnable prompt tokens are placed right after the prefix (class/register) tokens:
``[prefix, prompts, patches]``.

* VPT-shallow: prompts enter before the first selected block and travel through the following
  blocks like ordinary tokens; the last selected block removes them again.
* VPT-deep: every selected block gets its own fresh prompts; the prompts a block outputs are dropped.

The prompt tokens are part of the token tensor between the blocks of a shallow span (no state is kept
on any module): the backbone's :meth:`~medpeft_monai.backbones.FrozenBackbone.to_nchw` reads the patch
tokens as the last ``H*W`` tokens, so dense heads see the backbone's grid at any depth, and after the
span the layout is exactly the backbone's again.

Window prompts (:class:`WindowPromptConfig`, the task prompts of the cross-modal method): HieraDet and TinyViT
attend inside local windows of a token grid (HieraDet also pools queries at stage changes), so prompt tokens
cannot simply be appended to a token sequence. Each selected block gets ``P`` learnable prompts ``p`` that every window
attends to as extra keys and values, computed by the block's own (possibly LoRA-adapted) projection:
``[K_p; V_p] = W_kv p``, ``Attn(Q_w, [K_w; K_p], [V_w; V_p])`` for every window ``w``. The prompts have no
query and no output, so the token grid and every later layer are exactly the backbone's (deep prompting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medpeft_monai.backbones import FrozenBackbone, unwrap
from medpeft_monai.peft.core import PeftConfig, PeftError, PeftModule, register_method, replace_module, select_blocks

__all__ = ["PromptedBlock", "VPTConfig", "WindowPromptAttention", "WindowPromptConfig"]


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


class WindowPromptAttention(PeftModule):
    """Windowed attention whose every window also attends to ``P`` learnable prompt keys/values.

    ``out = proj(softmax(Q [K; K_p]^T / sqrt(d) + [B, 0]) [V; V_p])`` with ``[Q, K, V] = qkv(x)`` per window and
    ``[_, K_p, V_p] = qkv(p)``. Two layouts of the wrapped attention:

    * SAM2's HieraDet ``MultiScaleAttention``: input ``(B, h, w, C)`` windows, thirds Q/K/V, ``Q`` max-pooled at
      q-pool blocks as the wrapped module does, no bias ``B``;
    * TinyViT's ``Attention``: input ``(B, N, C)`` windows, its own pre-norm (applied to the prompts too),
      ``[q_h, k_h, v_h]`` per head and a relative-position bias ``B`` over the window (0 for the prompts).

    Args:
        attn: the frozen attention module (its ``qkv`` may carry LoRA).
        num_prompts: ``P``.
    """

    wraps = ("attn",)

    def __init__(self, attn: nn.Module, num_prompts: int) -> None:
        super().__init__()
        self.attn = attn
        self.prompts = nn.Parameter(torch.empty(int(num_prompts), unwrap(unwrap(attn).qkv).in_features))
        nn.init.trunc_normal_(self.prompts, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = unwrap(self.attn)
        return self._tinyvit(base, x) if hasattr(base, "attention_biases") else self._hiera(base, x)

    def _hiera(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        heads = base.num_heads
        q, k, v = base.qkv(x).reshape(b, h * w, 3, heads, -1).unbind(2)
        if base.q_pool is not None:
            q = base.q_pool(q.reshape(b, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, heads, -1)
        _, kp, vp = base.qkv(self.prompts.to(x.dtype)).reshape(1, -1, 3, heads, k.shape[-1]).unbind(2)
        k = torch.cat([k, kp.expand(b, -1, -1, -1)], dim=1)
        v = torch.cat([v, vp.expand(b, -1, -1, -1)], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return base.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def _tinyvit(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        split = [base.key_dim, base.key_dim, base.val_dim]
        q, k, v = base.qkv(base.norm(x)).view(b, n, base.num_heads, -1).split(split, dim=3)
        _, kp, vp = base.qkv(base.norm(self.prompts.to(x.dtype))).view(1, -1, base.num_heads, sum(split)).split(
            split, dim=3)
        k = torch.cat([k, kp.expand(b, -1, -1, -1)], dim=1)
        v = torch.cat([v, vp.expand(b, -1, -1, -1)], dim=1)
        bias = F.pad(base.get_attention_biases(x.device), (0, self.prompts.shape[0])).to(q.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return base.proj(out.transpose(1, 2).reshape(b, n, base.out_dim))


@register_method
@dataclass
class WindowPromptConfig(PeftConfig):
    """Window prompts (task prompts) in the attention of the selected blocks of a windowed-attention backbone:
    SAM2 Hiera (HieraDet) or TinyViT (e.g. LiteMedSAM's encoder).

    Args:
        num_prompts: ``P`` prompt tokens per block.
    """

    method: ClassVar[str] = "window_prompt"
    num_prompts: int = 4

    def inject(self, backbone: FrozenBackbone) -> None:
        if backbone.family not in ("sam2", "tinyvit"):
            raise PeftError(f"window_prompt needs a SAM2 Hiera (HieraDet) or TinyViT backbone, e.g. sam2_hiera_tiny "
                            f"or tiny_vit_5m_224; {backbone.name} is {backbone.family!r} (use method 'vpt' for "
                            "ViT-family backbones).")
        if self.num_prompts < 1:
            raise PeftError(f"num_prompts must be >= 1, got {self.num_prompts}.")
        for i in select_blocks(backbone, self.blocks):
            name = f"{backbone.blocks[i].name}.attn"
            site = backbone.model.get_submodule(name)
            replace_module(backbone.model, name, WindowPromptAttention(site, self.num_prompts))
