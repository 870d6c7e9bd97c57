"""Bottleneck adapters: Adapter (Houlsby et al. 2019), AdaptFormer (Chen et al. 2022) and
Convpass (Jie & Deng 2022).

All share the bottleneck ``a(h) = Up(act(Mid(act(Down(h)))))`` with a zero-initialised ``Up``, so an
adapted block computes exactly what the frozen block computes at initialisation.

* Adapter, sequential after the MLP: ``y = MLP(LN(x)); y <- y + a(y)``.
* AdaptFormer, parallel to the MLP on the un-normalised stream: ``y = MLP(LN(x)) + s * a(x)``.
* Convpass, parallel to attention and MLP, with a 3x3 convolution on the token grid as ``Mid``:
  ``x <- x + Attn(LN1 x) + s * c1(LN1 x)``, ``x <- x + MLP(LN2 x) + s * c2(LN2 x)``.
  Prefix (class/register) tokens bypass the convolution.

Token grids come from the backbone's :class:`~medpeft_monai.backbones.BlockInfo`, never from
``sqrt(N - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medpeft_monai.backbones import BlockInfo, FrozenBackbone, unwrap
from medpeft_monai.peft.core import PeftConfig, PeftError, PeftModule, register_method, select_blocks

__all__ = ["AdaptFormerConfig", "AdapterConfig", "Bottleneck", "ConvpassConfig", "TokenGridConv"]


class TokenGridConv(nn.Module):
    """Apply a 2D module to the patch tokens of ``(B, extra + H*W, m)`` tokens; the tokens in front pass.

    The patch tokens are the last ``H*W`` (class/register tokens, and prompt tokens of a stacked VPT,
    come first). Also accepts ``(B, H, W, m)`` (Swin, SAM2) tokens.
    """

    def __init__(self, conv: nn.Module, grid: tuple[int, int], num_prefix_tokens: int) -> None:
        super().__init__()
        self.conv, self.grid, self.num_prefix_tokens = conv, tuple(grid), int(num_prefix_tokens)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim == 4:  # (B, H, W, m)
            return self.conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        b, n, m = h.shape
        gh, gw = self.grid
        if n < self.num_prefix_tokens + gh * gw:
            raise PeftError(f"Token count {n} does not match {self.num_prefix_tokens} prefix + {gh}x{gw} grid; the "
                            "image size differs from the one the backbone was built for.")
        p = n - gh * gw
        prefix, patches = h[:, :p], h[:, p:]
        grid = patches.transpose(1, 2).reshape(b, m, gh, gw)
        out = self.conv(grid).flatten(2).transpose(1, 2)
        return torch.cat([prefix, out], dim=1)


class Bottleneck(PeftModule):
    """``a(h) = Up(act(Mid(act(Down(h)))))`` with ``Up`` zero-initialised, or, with ``gate=True``,
    ``a(h) = gamma * Up(...)`` with ``Up`` at PyTorch's default initialisation and a per-channel gate
    ``gamma`` (width ``C``) initialised to zero.

    Both start as the identity. They differ in the first optimiser steps: under Adam every entry of a
    zero-initialised ``Up`` moves by about the learning rate at once, so the output jumps by about
    ``lr * m * E|h|`` per channel in every adapted block (large for wide bottlenecks such as DKA's
    m = 192), whereas the gate grows by at most ``lr`` per step and scales a bounded ``Up(...)``.

    Args:
        width: token width ``C``.
        hidden: bottleneck width ``m``.
        mid: optional module on the ``m``-wide tokens (e.g. :class:`TokenGridConv`).
        act: activation module class.
        dropout: dropout before ``Up``.
        gate: use the zero-initialised gate ``gamma`` instead of a zero-initialised ``Up``.
    """

    def __init__(self, width: int, hidden: int, mid: nn.Module | None = None, act: type[nn.Module] = nn.GELU,
                 dropout: float = 0.0, gate: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.act = act()
        self.mid = mid
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(hidden, width)
        if gate:
            self.gate = nn.Parameter(torch.zeros(width))
        else:
            self.gate = None
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.act(self.down(h))
        if self.mid is not None:
            z = self.act(self.mid(z))
        out = self.up(self.dropout(z))
        return out if self.gate is None else out * self.gate


class SequentialAdapter(PeftModule):
    """``y = f(h); return y + a(y)`` (Houlsby placement after a sub-layer)."""

    wraps = ("inner",)

    def __init__(self, inner: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.inner(h)
        return y + self.adapter(y)


class ParallelAdapter(PeftModule):
    """``return f(norm(x)) + s * a(x)``; with ``norm=None`` the adapter reads ``f``'s own input.

    With a norm, the block's own norm (``norm_attr``, e.g. ``"norm2"``) has been moved in here and
    replaced by ``Identity`` so that the adapter sees the un-normalised stream; :meth:`restore` moves it back.
    """

    wraps = ("inner", "norm")

    def __init__(self, inner: nn.Module, adapter: Bottleneck, scale: float, norm: nn.Module | None = None,
                 norm_attr: str | None = None) -> None:
        super().__init__()
        self.inner, self.adapter, self.scale, self.norm = inner, adapter, float(scale), norm
        self.norm_attr = norm_attr

    def restore(self, parent: nn.Module, attr: str) -> None:
        if self.norm is not None and isinstance(parent, PeftModule):
            raise PeftError(f"{type(self).__name__} holds the block's {self.norm_attr} and is wrapped by another "
                            f"adapter ({parent.adapter_name!r}); unload that adapter first.")
        setattr(parent, attr, self.inner)
        if self.norm is not None:
            setattr(parent, self.norm_attr, self.norm)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = x if self.norm is None else self.norm(x)
        return self.inner(h, *args, **kwargs) + self.scale * self.adapter(x)


def _mlp_width(block: nn.Module) -> int:
    """Width of the tokens entering the block's MLP (differs from the block input in Hiera's stage openers)."""
    return next(m for m in block.mlp.modules() if isinstance(m, nn.Linear)).in_features


def _blocks(backbone: FrozenBackbone, blocks: list[int] | None, formats: tuple[str, ...], method: str):
    for i in select_blocks(backbone, blocks):
        info = backbone.blocks[i]
        if info.token_format not in formats:
            raise PeftError(f"{method} needs tokens in {formats} layout; {backbone.name} block {i} has "
                            f"{info.token_format!r} tokens. Use a backbone whose blocks take those tokens.")
        block = unwrap(backbone.block_module(i))
        if not hasattr(block, "mlp"):
            raise PeftError(f"{method}: block {info.name} of {backbone.name} has no `mlp`.")
        yield info, block


@register_method
@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapter after the MLP of each selected block (Houlsby et al. 2019).

    Args:
        hidden: bottleneck width ``m``.
        dropout: dropout before the up-projection.
    """

    method: ClassVar[str] = "adapter"
    hidden: int = 64
    dropout: float = 0.0

    def inject(self, backbone: FrozenBackbone) -> None:
        for _, block in _blocks(backbone, self.blocks, ("nlc", "nhwc", "unrolled"), self.method):
            block.mlp = SequentialAdapter(block.mlp, Bottleneck(_mlp_width(block), self.hidden,
                                                                dropout=self.dropout))


@register_method
@dataclass
class AdaptFormerConfig(PeftConfig):
    """AdaptFormer: a scaled bottleneck parallel to the MLP, reading the un-normalised stream.

    The block's ``norm2`` moves inside the wrapper so the MLP still sees ``LN(x)`` while the adapter
    sees ``x``: ``x <- x + MLP(LN(x)) + s * a(x)``. Where the MLP holds its own norm (TinyViT's
    ``NormMlp``) it already reads ``x``, and so does the adapter.

    Args:
        hidden: bottleneck width ``m``.
        scale: ``s``.
    """

    method: ClassVar[str] = "adaptformer"
    hidden: int = 64
    scale: float = 0.1
    dropout: float = 0.0

    def inject(self, backbone: FrozenBackbone) -> None:
        for _, block in _blocks(backbone, self.blocks, ("nlc", "nhwc", "unrolled"), self.method):
            width = _mlp_width(block)
            own_norm = hasattr(block, "norm2")
            block.mlp = ParallelAdapter(block.mlp, Bottleneck(width, self.hidden, dropout=self.dropout),
                                        self.scale, norm=block.norm2 if own_norm else None,
                                        norm_attr="norm2" if own_norm else None)
            if own_norm:
                block.norm2 = nn.Identity()


@register_method
@dataclass
class ConvpassConfig(PeftConfig):
    """Convpass: convolutional bypasses parallel to attention and MLP (ViT-family backbones).

    Args:
        hidden: bottleneck width ``m`` (paper: 8).
        kernel_size: kernel of the full convolution on the token grid (paper: 3).
        scale: ``s`` (paper: 0.01 to 10 per dataset; default 1).
    """

    method: ClassVar[str] = "convpass"
    hidden: int = 8
    kernel_size: int = 3
    scale: float = 1.0

    def make(self, info: BlockInfo) -> Bottleneck:
        conv = nn.Conv2d(self.hidden, self.hidden, self.kernel_size, padding=self.kernel_size // 2)
        return Bottleneck(info.width, self.hidden, TokenGridConv(conv, info.grid, info.num_prefix_tokens))

    def inject(self, backbone: FrozenBackbone) -> None:
        for info, block in _blocks(backbone, self.blocks, ("nlc",), self.method):
            block.attn = ParallelAdapter(block.attn, self.make(info), self.scale)
            block.mlp = ParallelAdapter(block.mlp, self.make(info), self.scale)
