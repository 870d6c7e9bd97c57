"""DKA: Dual-Kernel Adapter (ICLR 2026, "Expanding Spatial Horizons for Data-Constrained Medical Image
Analysis").

A bottleneck adapter whose middle transformation is a pair of parallel depthwise convolutions on the
patch-token grid, a large kernel (51 x 51) that widens the effective receptive field and a small one
(5 x 5) that keeps local detail::

    z      = GELU(Down(x))                                  Down: C -> m (linear), then reshape to (B, m, H, W)
    DKA(x) = x + s * Up(GELU(DW_51(z) + DW_5(z)))           Up: m -> C (linear, zero-initialised)

GELU comes *before* the convolutions (on the down-projected tokens) and again after their sum, as in
the paper's description and released code. Class/register (prefix) tokens are set aside before the
convolution (they only see ``Up(GELU(GELU(Down(x))))``); the token grid and prefix count come from the
backbone's :class:`~medpeft_monai.backbones.BlockInfo`, never from ``sqrt(N - 1)``.

Placement (``position``):

* ``"block"`` (default): sequentially after every selected transformer block, on the residual stream,
  ``x <- block(x); x <- x + s * a(x)``. This is where the authors' released code puts it (a hook after
  each block's forward); it is also the post-MLP site of Mona (we read the paper's "following Yin et al.
  2024" as Mona, which adds a sequential adapter after attention and after the MLP).
* ``"mlp"``: parallel to the MLP, reading the un-normalised stream like AdaptFormer,
  ``x <- x + MLP(LN2 x) + s * a(x)`` (inside the block's layer-scale / drop-path if it has them).
* ``"attn"``: parallel to self-attention, ``x <- x + Attn(LN1 x) + s * a(x)`` (ViT-family only: Swin and
  Hiera attention run on windows / pooled queries, not on the token grid).
* ``"both"``: ``"attn"`` and ``"mlp"``.

Backbones: ViT family (``"nlc"``: class and register tokens, non-square grids), Swin and SAM2-HieraDet
(``"nhwc"``; a Swin MLP sees ``(B, H*W, C)`` raster tokens) and timm Hiera (``"unrolled"``: tokens are
put back into raster order with the model's own ``Reroll`` permutation, convolved and unrolled again).

Inference fast path: both branches are linear, so they sum into one depthwise kernel (the small kernel
zero-padded to the large size, biases added). On an ``H x W`` grid, offsets beyond ``+-(H-1)`` only meet
zero padding, so the merged kernel is also cropped to at most ``(2H-1) x (2W-1)`` with identical output
(e.g. a 14x14 ViT-B grid needs 27x27 instead of 51x51). :func:`~medpeft_monai.peft.merge_peft` switches
every :class:`DualKernelConv` to that single convolution; the adapter itself (GELU, projections) stays,
because it is non-linear and cannot fold into the frozen backbone. Gradients still flow in merged mode
(the kernel is then rebuilt from the parameters on each forward), so training works in either mode.

The paper trains adapters and head with different learning rates (adapter 1e-3, head 1e-4);
:func:`medpeft_monai.peft.param_groups` builds those optimizer groups for any PEFT model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medpeft_monai.backbones import BlockInfo, FrozenBackbone, unwrap
from medpeft_monai.peft.adapters import Bottleneck, ParallelAdapter, TokenGridConv
from medpeft_monai.peft.core import (
    ParameterCache,
    PeftConfig,
    PeftError,
    PeftModule,
    register_method,
    replace_module,
    select_blocks,
)

__all__ = [
    "DKAAdapter",
    "DKABlock",
    "DKAConfig",
    "DKAParallel",
    "DualKernelConv",
    "UnrolledTokenConv",
    "cropped_kernel_size",
]

POSITIONS = ("block", "mlp", "attn", "both")


def cropped_kernel_size(kernel: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Largest useful size of an odd ``kernel`` on an ``(H, W)`` grid: ``min(K, 2H-1) x min(K, 2W-1)``."""
    return min(kernel, 2 * int(grid[0]) - 1), min(kernel, 2 * int(grid[1]) - 1)


def _check_kernel(name: str, k: int) -> int:
    if int(k) != k or k < 1 or k % 2 == 0:
        raise PeftError(f"{name} must be a positive odd integer (same-size 'same' padding), got {k}.")
    return int(k)


class DualKernelConv(PeftModule):
    """``DW_large(z) + DW_small(z)``: two parallel depthwise convolutions with 'same' padding.

    The parameters are the two branches (``large`` and ``small`` ``nn.Conv2d``). Where it is faster, the
    forward pass runs **one** depthwise convolution with their sum cropped to the grid
    (:meth:`merged_kernel`) instead: same output and, since that kernel is rebuilt from the parameters with
    autograd on every forward, the same gradients for both branches' weights and biases and for the input.

    Modes:

    * unmerged (training, and evaluation before :meth:`merge`), ``path="auto"`` (default): the cropped
      single kernel where :meth:`single_kernel_pays` says so for the input's grid, else the two branches;
      ``path="single"`` or ``path="two_branch"`` force one form (the latter is the reference, also
      :meth:`two_branch`);
    * merged (:meth:`merge`, :func:`~medpeft_monai.peft.merge_peft`): without autograd (inference, or
      frozen parameters) a cached kernel keyed by the parameter versions, so an optimizer step or
      ``load_state_dict`` rebuilds it; with autograd the kernel rebuilt on every forward.

    How ``"auto"`` decides (kernel size against grid): per output pixel the single kernel costs
    ``kh * kw`` multiply-adds (the kernel cropped to the grid, :func:`cropped_kernel_size`) and the two
    branches ``K^2 + k^2``. Measured on the CPU (oneDNN depthwise convolutions, forward + backward, paired
    timings with ``scripts/bench_dka.py --conv-grids``; ``BENCHMARKS.md``) the time ratio single /
    two-branch follows that count where it is well below 1: 0.02 on 4x4 and 6x6 grids (7x7 and 11x11
    kernels), 0.3-0.4 on 14x14, 0.85-0.9 on 24x24, 0.9 on 25x25 and 40x24. Where the grid reaches the
    whole kernel (``H, W >= (K+1)/2``, count ratio 0.99 for 51/5) only the 5x5 branch is saved and the
    measured ratio was 0.98-1.04 across runs, i.e. a tie within noise, so the reference form is kept
    there. Rule: the single kernel when its count is at most ``SINGLE_KERNEL_MAX_COST`` (0.95) of the
    two branches'.

    Args:
        channels: ``m``, the bottleneck width (one filter per channel).
        large: large kernel size (paper: 51).
        small: small kernel size (paper: 5); must not exceed ``large``.
        bias: give each branch a bias (the merged bias is their sum).
        grid: the ``(H, W)`` grid this module will see, if known; :meth:`merge` then precomputes the
            cropped kernel for it (other input sizes are handled on the fly).
        path: unmerged forward: ``"auto"`` (see above), ``"single"`` or ``"two_branch"`` (reference).

    Input and output ``(B, m, H, W)``.
    """

    mergeable: ClassVar[bool] = True
    PATHS: ClassVar[tuple[str, ...]] = ("auto", "single", "two_branch")
    #: ``"auto"`` takes the single kernel when its multiply-adds are at most this share of the two branches'
    SINGLE_KERNEL_MAX_COST: ClassVar[float] = 0.95

    def __init__(self, channels: int, large: int = 51, small: int = 5, bias: bool = True,
                 grid: tuple[int, int] | None = None, path: str = "auto") -> None:
        super().__init__()
        large, small = _check_kernel("large_kernel", large), _check_kernel("small_kernel", small)
        if small > large:
            raise PeftError(f"small_kernel ({small}) must not exceed large_kernel ({large}).")
        if channels < 1:
            raise PeftError(f"The adapter width must be >= 1, got {channels}.")
        self.channels, self.large_size, self.small_size = int(channels), large, small
        self.large = nn.Conv2d(channels, channels, large, padding=large // 2, groups=channels, bias=bias)
        self.small = nn.Conv2d(channels, channels, small, padding=small // 2, groups=channels, bias=bias)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.merged = False
        self.path = path
        self._kernel_cache = ParameterCache()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, large={self.large_size}, small={self.small_size}, merged={self.merged}, "
                f"path={self.path!r}")

    @property
    def path(self) -> str:
        """Unmerged forward: ``"auto"``, ``"single"`` (cropped single kernel) or ``"two_branch"`` (reference)."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in self.PATHS:
            raise PeftError(f"DualKernelConv path must be one of {self.PATHS}, got {value!r}.")
        self._path = value

    def single_kernel_pays(self, grid: tuple[int, int]) -> bool:
        """Whether the cropped single kernel is the cheaper form on ``grid`` (the ``"auto"`` rule)."""
        kh, kw = cropped_kernel_size(self.large_size, grid)
        two = self.large_size ** 2 + self.small_size ** 2
        return kh * kw <= self.SINGLE_KERNEL_MAX_COST * two

    def uses_single_kernel(self, grid: tuple[int, int]) -> bool:
        """Whether an unmerged forward on ``grid`` runs the single kernel (else the two branches)."""
        return self.path == "single" or (self.path == "auto" and self.single_kernel_pays(grid))

    def merged_kernel(self, grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One depthwise kernel (and bias) equal to both branches together.

        Args:
            grid: ``(H, W)`` of the input; the kernel is cropped to
                :func:`cropped_kernel_size` for it. ``None`` keeps the full ``large x large`` kernel.

        Returns:
            ``(weight, bias)`` with ``weight`` of shape ``(m, 1, kh, kw)`` and ``bias`` ``(m,)`` or ``None``.
            Differentiable with respect to the branch parameters.
        """
        k, s = self.large_size, self.small_size
        kh, kw = (k, k) if grid is None else cropped_kernel_size(k, grid)
        # crop each branch to the centred (kh, kw) window first, then add the small one in its centre
        top, left = (k - kh) // 2, (k - kw) // 2
        weight = self.large.weight[:, :, top:top + kh, left:left + kw]
        sh, sw = min(s, kh), min(s, kw)
        small = self.small.weight[:, :, (s - sh) // 2:(s - sh) // 2 + sh, (s - sw) // 2:(s - sw) // 2 + sw]
        ph, pw = (kh - sh) // 2, (kw - sw) // 2
        weight = weight + F.pad(small, (pw, pw, ph, ph))
        bias = None
        if self.large.bias is not None:
            bias = self.large.bias + self.small.bias
        return weight, bias

    def _cached_kernel(self, grid: tuple[int, int], ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged kernel for ``grid`` in ``ref``'s dtype, rebuilt when a parameter changes (as LoRA's)."""

        def compute():
            w, b = self.merged_kernel(grid)
            return w.to(ref.dtype).contiguous(), None if b is None else b.to(ref.dtype)

        return self._kernel_cache.get(list(self.parameters()), compute, grid, ref.device, ref.dtype)

    def two_branch(self, z: torch.Tensor) -> torch.Tensor:
        """The reference form: both depthwise convolutions as parameterised ('same' padding), summed."""
        return self.large(z) + self.small(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        grid = (int(z.shape[-2]), int(z.shape[-1]))
        if not self.merged and not self.uses_single_kernel(grid):
            return self.two_branch(z)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if self.merged and not needs_grad:
            w, b = self._cached_kernel(grid, z)
        else:  # rebuilt with autograd: gradients are those of the two-branch form
            w, b = self.merged_kernel(grid)
        return F.conv2d(z, w, b, padding=(w.shape[-2] // 2, w.shape[-1] // 2), groups=self.channels)

    def merge(self) -> None:
        """Switch to the single cropped-kernel convolution (idempotent)."""
        self.merged = True
        self._kernel_cache.clear()
        if self.grid is not None:
            self._cached_kernel(self.grid, self.large.weight)

    def unmerge(self) -> None:
        """Back to the unmerged forward of :attr:`path` (idempotent; the parameters were never changed)."""
        self.merged = False
        self._kernel_cache.clear()


class _MergeChildren:
    """Mixin for the modules around a :class:`DualKernelConv`: they merge by their convolution merging
    (:func:`~medpeft_monai.peft.merge_peft` switches every module of the adapter), so nothing to do here."""

    mergeable: ClassVar[bool] = True

    def merge(self) -> None:
        """Nothing of its own to merge."""

    def unmerge(self) -> None:
        """Nothing of its own to unmerge."""


class UnrolledTokenConv(nn.Module):
    """Apply a 2D module to timm-Hiera tokens kept in mask-unit ("unrolled") order.

    ``perm[r]`` is the unrolled index of the token at raster position ``r`` (from the model's
    ``Reroll``); tokens are gathered into raster order, convolved, and scattered back.
    """

    def __init__(self, conv: nn.Module, perm: torch.Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.conv, self.grid = conv, (int(grid[0]), int(grid[1]))
        if perm.numel() != self.grid[0] * self.grid[1]:
            raise PeftError(f"Token permutation of length {perm.numel()} does not fit the {grid} grid.")
        self.register_buffer("perm", perm.long().flatten(), persistent=False)
        self.register_buffer("inverse", torch.argsort(self.perm), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, m = h.shape
        gh, gw = self.grid
        if n != gh * gw:
            raise PeftError(f"Token count {n} does not match the {gh}x{gw} grid; the image size differs from "
                            "the one the backbone was built for.")
        raster = h[:, self.perm].transpose(1, 2).reshape(b, m, gh, gw)
        out = self.conv(raster).flatten(2).transpose(1, 2)
        return out[:, self.inverse]


class DKAAdapter(_MergeChildren, Bottleneck):
    """``a(x) = Up(GELU(DW_large(z) + DW_small(z)))``, ``z = GELU(Down(x))``; ``Up`` zero-initialised.

    Args:
        width: token width ``C``.
        hidden: bottleneck width ``m`` (paper: 16 for classification, 192 for segmentation).
        grid: patch-token grid ``(H, W)``.
        num_prefix_tokens: class/register tokens in front of the patch tokens (they bypass the convolution).
        large_kernel, small_kernel: kernel sizes (paper: 51 and 5).
        dropout: dropout before ``Up``.
        perm: for Hiera's unrolled tokens, the raster -> unrolled token permutation (see
            :class:`UnrolledTokenConv`); ``None`` for raster / NHWC tokens.

    Input ``(B, prefix + H*W, C)``, ``(B, H, W, C)`` or unrolled ``(B, H*W, C)``; output the same shape.
    """

    def __init__(self, width: int, hidden: int, grid: tuple[int, int], num_prefix_tokens: int = 0,
                 large_kernel: int = 51, small_kernel: int = 5, dropout: float = 0.0,
                 perm: torch.Tensor | None = None, gate: bool = True) -> None:
        conv = DualKernelConv(hidden, large_kernel, small_kernel, grid=grid)
        if perm is None:
            mid: nn.Module = TokenGridConv(conv, grid, num_prefix_tokens)
        else:
            mid = UnrolledTokenConv(conv, perm, grid)
        super().__init__(width, hidden, mid=mid, act=nn.GELU, dropout=dropout, gate=gate)

    @property
    def dual_conv(self) -> DualKernelConv:
        return self.mid.conv


class DKAParallel(_MergeChildren, ParallelAdapter):
    """``f(norm(x)) + s * a(x)`` with a :class:`DKAAdapter` (mergeable: switches its convolution only)."""


class DKABlock(_MergeChildren, PeftModule):
    """A transformer block followed by a DKA on its output: ``y = block(x); return y + s * a(y)``.

    Attributes the wrapper does not have (``attn``, ``mlp``, ``dim_out`` ...) are read from the block.
    """

    wraps = ("inner",)

    def __init__(self, block: nn.Module, adapter: DKAAdapter, scale: float) -> None:
        super().__init__()
        self.inner, self.adapter, self.scale = block, adapter, float(scale)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inner", "adapter") or name.startswith("__"):
                raise
            return getattr(super().__getattr__("inner"), name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.inner(x, *args, **kwargs)
        return y + self.scale * self.adapter(y)


def _out_width(block: nn.Module) -> int:
    """Width of the block output (= MLP input; differs from the block input in Hiera's stage openers)."""
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        raise PeftError(f"DKA: block {type(block).__name__} has no `mlp`; cannot tell its output width.")
    return next(m for m in mlp.modules() if isinstance(m, nn.Linear)).in_features


def _unrolled_perm(backbone: FrozenBackbone, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Raster -> unrolled permutation of the tokens leaving (and inside the MLP of) Hiera block ``index``."""
    reroll = getattr(backbone.model, "reroll", None)
    schedule = getattr(reroll, "schedule", None)
    if reroll is None or schedule is None or index not in schedule:
        raise PeftError(f"DKA: {backbone.name} has unrolled tokens but no timm `Reroll` to put them in raster "
                        "order; use a SAM2-Hiera backbone (sam2_hiera_*) whose blocks take (B, H, W, C) tokens.")
    size = [int(s) for s in schedule[index][1]]
    if len(size) != 2:
        raise PeftError(f"DKA supports 2D Hiera models only; {backbone.name} has a {len(size)}D token grid.")
    n = size[0] * size[1]
    raster = reroll(torch.arange(n).view(1, n, 1), index)
    if tuple(raster.shape) != (1, size[0], size[1], 1):
        raise PeftError(f"DKA: unexpected Reroll output {tuple(raster.shape)} for {backbone.name} block {index}; "
                        "use a sam2_hiera_* backbone instead.")
    return raster.reshape(-1), (size[0], size[1])


@register_method
@dataclass
class DKAConfig(PeftConfig):
    """Dual-Kernel Adapter (see the module docstring for the equation and the placements).

    Args:
        hidden: bottleneck width ``m`` (paper: 16 for classification, 192 for segmentation).
        large_kernel: large depthwise kernel (paper: 51; odd).
        small_kernel: small depthwise kernel (paper: 5; odd, at most ``large_kernel``).
        position: ``"block"`` (default: after each block, as in the released code and Mona),
            ``"mlp"`` (parallel to the MLP), ``"attn"`` (parallel to attention, ViT only) or ``"both"``.
        scale: ``s``, multiplies the adapter output.
        dropout: dropout before the up-projection (the released code uses 0.1).
        gate: ``a = gamma * Up(...)`` with ``Up`` at PyTorch's default initialisation (as in the released
            code) and a zero-initialised per-channel gate ``gamma`` (default), instead of a zero-initialised
            ``Up``. Both start as the identity, but at the paper's m = 192 and lr 1e-3 a zero-initialised
            ``Up`` moved a pretrained LiteMedSAM encoder's last features by 78 % of their norm in one Adam step
            (all ten adapters jump at once); with the gate the step is bounded (see ``tests/test_tinyvit.py``
            and ``BENCHMARKS.md``). ``gate=False`` is the plain zero-initialised form.
        blocks: block indices to adapt (``None``: all).

    Train with :func:`medpeft_monai.peft.param_groups` (adapter lr 1e-3, head lr 1e-4 in the paper).
    """

    method: ClassVar[str] = "dka"
    hidden: int = 16
    large_kernel: int = 51
    small_kernel: int = 5
    position: str = "block"
    scale: float = 1.0
    dropout: float = 0.1
    gate: bool = True

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise PeftError(f"DKA position must be one of {POSITIONS}, got {self.position!r}.")
        if int(self.hidden) < 1:
            raise PeftError(f"DKA hidden (m) must be >= 1, got {self.hidden}.")
        _check_kernel("large_kernel", self.large_kernel)
        _check_kernel("small_kernel", self.small_kernel)
        if self.small_kernel > self.large_kernel:
            raise PeftError(f"small_kernel ({self.small_kernel}) must not exceed large_kernel ({self.large_kernel}).")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftError(f"DKA dropout must be in [0, 1), got {self.dropout}.")

    def _adapter(self, width: int, grid: tuple[int, int], prefix: int, perm: torch.Tensor | None = None) -> DKAAdapter:
        return DKAAdapter(width, self.hidden, grid, prefix, self.large_kernel, self.small_kernel, self.dropout, perm,
                          gate=self.gate)

    def _output_layout(self, backbone: FrozenBackbone, info: BlockInfo, block: nn.Module):
        """``(grid, prefix, perm)`` of the tokens leaving the block / entering its MLP."""
        if info.token_format == "nlc":
            return info.grid, info.num_prefix_tokens, None
        if info.token_format == "nhwc":
            # Swin: the MLP sees (B, H*W, C) raster tokens of the block grid; SAM2: (B, H, W, C) of the
            # output grid (TokenGridConv reads a 4D grid from the tensor itself).
            return info.grid, 0, None
        if info.token_format == "unrolled":
            perm, grid = _unrolled_perm(backbone, info.index)
            return grid, 0, perm
        raise PeftError(f"DKA does not know token format {info.token_format!r} ({backbone.name} block {info.index}).")

    def inject(self, backbone: FrozenBackbone) -> None:
        wants_attn = self.position in ("attn", "both")
        todo = []
        for i in select_blocks(backbone, self.blocks):
            info = backbone.blocks[i]
            block = unwrap(backbone.block_module(i))
            if wants_attn and info.token_format != "nlc":
                raise PeftError(f"DKA position={self.position!r} needs ViT-family blocks (attention on the token "
                                f"grid); {backbone.name} block {i} has {info.token_format!r} tokens with windowed "
                                "or pooled attention. Use position='block' or 'mlp'.")
            for attr in (("norm1", "attn") if wants_attn else ()) + (
                    ("norm2", "mlp") if self.position in ("mlp", "both") else ()):
                if not hasattr(block, attr):
                    raise PeftError(f"DKA: block {info.name} of {backbone.name} has no `{attr}`.")
            todo.append((info, block))
        for info, block in todo:
            grid, prefix, perm = self._output_layout(backbone, info, block)
            width = _out_width(block)
            if self.position == "block":
                site = backbone.model.get_submodule(info.name)
                replace_module(backbone.model, info.name, DKABlock(site, self._adapter(width, grid, prefix, perm),
                                                                   self.scale))
                continue
            if wants_attn:
                block.attn = DKAParallel(block.attn, self._adapter(info.width, info.grid, info.num_prefix_tokens),
                                         self.scale, norm=block.norm1, norm_attr="norm1")
                block.norm1 = nn.Identity()
            if self.position in ("mlp", "both"):
                block.mlp = DKAParallel(block.mlp, self._adapter(width, grid, prefix, perm), self.scale,
                                        norm=block.norm2, norm_attr="norm2")
                block.norm2 = nn.Identity()
