"""LoRA (Hu et al. 2022) on linear layers, with Q/V-only adaptation of timm's fused ``qkv``.

For a frozen ``W`` the adapted layer computes ``y = W x + (alpha / r) * B A x`` with ``A`` (r x d_in,
Kaiming-uniform) and ``B`` (d_out x r, zeros), so the output is unchanged at initialisation. On a
fused ``qkv`` projection only the chosen parts get a low-rank pair: rows ordered Q, K, V (``d = d_out / 3``
each) in timm's ViT, Swin and Hiera (at Hiera's q-pool blocks ``d_in != d``), and per head
``[q_h, k_h, v_h]`` in TinyViT (read from its attention's ``num_heads``, ``key_dim``, ``val_dim``). The K
rows of ``W`` and the K output are never touched: the low-rank updates are added to the Q and V columns of
the frozen layer's output, as one product whose ``B`` is zero on the K columns (:meth:`LoRALinear.factors`).

Merged form (:func:`~medpeft_monai.peft.merge_peft`): one linear layer with ``W + (alpha / r) B A``,
computed from the unchanged parameters and cached until one of them changes, so a checkpoint loaded
after merging is served correctly and ``W`` itself is never modified.

LoRA also targets plain modules by name (:meth:`LoRAConfig.inject_module`), e.g. the attention
projections of MONAI's ``DiffusionModelUNet``; a second LoRA may wrap a first one (stacked adapters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medpeft_monai.backbones import FrozenBackbone, unwrap
from medpeft_monai.peft.core import (
    ParameterCache,
    PeftConfig,
    PeftError,
    PeftModule,
    find_module_targets,
    find_targets,
    register_method,
    replace_module,
)

__all__ = ["LoRAConfig", "LoRALinear"]

QKV_PARTS = "qkv"


class LoRALinear(PeftModule):
    """A frozen ``nn.Linear`` (or an already adapted one) plus low-rank updates on some of its output slices.

    Args:
        base: the frozen linear layer, or a :class:`LoRALinear` of another adapter around it.
        rank: ``r``, the rank of each update.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        parts: for a fused qkv layer, which of ``"q"``, ``"k"``, ``"v"`` to adapt (e.g. ``"qv"``);
            ``None`` adapts the whole output.
        dropout: dropout on the input of the low-rank path.
        heads: ``(num_heads, key_dim, val_dim)`` for a qkv layer whose output is laid out per head as
            ``[q_h, k_h, v_h]`` (TinyViT); ``None``: the Q, K, V thirds are contiguous.
    """

    mergeable = True
    wraps = ("base",)

    def __init__(self, base: nn.Module, rank: int, alpha: float, parts: str | None = None,
                 dropout: float = 0.0, heads: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise PeftError(f"LoRA rank must be >= 1, got {rank}.")
        linear = unwrap(base)
        if not isinstance(linear, nn.Linear):
            raise PeftError(f"LoRA needs an nn.Linear, got {type(linear).__name__}.")
        self.base = base
        self.rank, self.scale = int(rank), float(alpha) / float(rank)
        d_in, d_out = linear.in_features, linear.out_features
        #: output columns of each adapted part: key -> ((lo, hi), ...), rows of lora_B in that order
        self.slices = self._columns(parts, d_out, heads)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, ranges in self.slices.items():
            a = torch.empty(self.rank, d_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(sum(hi - lo for lo, hi in ranges), self.rank))
        self.out_features = d_out
        #: the adapted output columns, in the order of the parts' ``lora_B`` rows
        cols = torch.cat([torch.arange(lo, hi) for ranges in self.slices.values() for lo, hi in ranges])
        self.register_buffer("columns", cols, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_weight = ParameterCache()

    @staticmethod
    def _columns(parts: str | None, d_out: int, heads: tuple[int, int, int] | None) -> dict:
        if parts is None:
            return {"all": ((0, d_out),)}
        if not parts or not set(parts) <= set(QKV_PARTS):
            raise PeftError(f"parts={parts!r} must be letters from 'qkv'.")
        if heads is not None:
            n, kd, vd = (int(v) for v in heads)
            if n * (2 * kd + vd) != d_out:
                raise PeftError(f"heads={heads} do not fit a qkv layer with out_features={d_out}.")
            offset, size = {"q": 0, "k": kd, "v": 2 * kd}, {"q": kd, "k": kd, "v": vd}
            step = 2 * kd + vd
            return {p: tuple((h * step + offset[p], h * step + offset[p] + size[p]) for h in range(n)) for p in parts}
        if d_out % 3:
            raise PeftError(f"parts={parts!r} needs a fused qkv layer (out_features divisible by 3); this layer "
                            f"has out_features={d_out}.")
        d = d_out // 3
        return {p: ((QKV_PARTS.index(p) * d, (QKV_PARTS.index(p) + 1) * d),) for p in parts}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of all parts at once, ``A`` ``(P r, d_in)``: the parts' ``A`` stacked; ``B``
        ``(d_out, P r)``: part ``p``'s ``B`` in columns ``p r .. (p + 1) r`` of that part's output rows, zero
        elsewhere. Then ``(alpha / r) B A`` is every part's update at its columns and exactly zero on the
        others (K)."""
        a = torch.cat(list(self.lora_A.values()))
        b = torch.block_diag(*self.lora_B.values())
        return a, b.new_zeros(self.out_features, b.shape[1]).index_copy(0, self.columns, b)

    def effective_weight(self) -> torch.Tensor:
        """``W`` plus every low-rank update of this and any inner LoRA layer (differentiable)."""
        w = self.base.effective_weight() if isinstance(self.base, LoRALinear) else unwrap(self.base).weight
        a, b = self.factors()
        return w + (self.scale * b @ a).to(w.dtype)

    def _chain_parameters(self) -> list[torch.Tensor]:
        params = [*self.lora_A.values(), *self.lora_B.values()]
        inner = self.base
        return params + (inner._chain_parameters() if isinstance(inner, LoRALinear) else [unwrap(inner).weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            bias = unwrap(self.base).bias
            if torch.is_grad_enabled() and any(p.requires_grad for p in self._chain_parameters()):
                return F.linear(x, self.effective_weight(), bias)
            w = self._merged_weight.get(self._chain_parameters(), self.effective_weight, x.dtype, x.device)
            return F.linear(x, w.to(x.dtype), bias)
        y = self.base(x)
        h = self.dropout(x)
        a, b = self.factors()
        # y + (alpha / r) (h A^T) B^T as one addmm, out of place: an in-place add into a slice of y would make
        # autograd copy the whole output in backward; the dtype casts are no-ops outside autocast
        low = (h.reshape(-1, h.shape[-1]) @ a.t()).to(y.dtype)
        return torch.addmm(y.reshape(-1, y.shape[-1]), low, b.t().to(y.dtype), alpha=self.scale).view(y.shape)

    def merge(self) -> None:
        """Serve from the folded weight (idempotent; the parameters are not changed)."""
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False
        self._merged_weight.clear()


@register_method
@dataclass
class LoRAConfig(PeftConfig):
    r"""LoRA on the linear layers matching ``target`` inside the selected blocks.

    Args:
        rank: rank ``r`` of every update.
        alpha: the update is scaled by ``alpha / r``.
        target: regex on block-relative module names (on a plain module without FrozenBackbone: on full
            module names, e.g. ``r".*attn\.to_[qv]"``); default: the fused attention ``qkv``.
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

    def _wrap(self, root: nn.Module, names: list[str]) -> None:
        for name in names:
            layer = root.get_submodule(name)
            if not isinstance(unwrap(layer), nn.Linear):
                raise PeftError(f"LoRA target {name} is a {type(unwrap(layer)).__name__}, not nn.Linear; "
                                "narrow `target` to linear layers.")
            parts = self.qkv_parts if name.endswith("qkv") else None
            attn = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
            heads = None
            if parts is not None and all(hasattr(attn, a) for a in ("num_heads", "key_dim", "val_dim")):
                heads = (attn.num_heads, attn.key_dim, attn.val_dim)  # TinyViT: q, k, v interleaved per head
            replace_module(root, name, LoRALinear(layer, self.rank, self.alpha, parts, self.dropout, heads))

    def inject(self, backbone: FrozenBackbone) -> None:
        self._wrap(backbone.model, find_targets(backbone, self.target, self.blocks))

    def inject_module(self, root: nn.Module) -> None:
        if self.blocks is not None:
            raise PeftError("LoRA on a plain module selects layers by `target` only; `blocks` needs a FrozenBackbone.")
        self._wrap(root, find_module_targets(root, self.target))
