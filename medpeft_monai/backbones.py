"""Frozen timm backbones that report their own token layout.

:class:`FrozenBackbone` wraps any timm ViT (incl. DINOv2 / CLIP / register-token variants), Swin or
Hiera / SAM2-Hiera model. It

* builds the model with no classifier (``num_classes=0``), at the requested ``image_size`` and
  ``in_chans`` (timm resamples position embeddings and folds RGB patch-embedding weights into the
  requested channel count when weights are loaded);
* loads weights from nowhere (``weights=None``), the hub (``"hub"``, only when online) or a local
  ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.npz`` file, with clear errors for files made
  for another architecture;
* freezes every parameter by default;
* describes every transformer block (:class:`BlockInfo`: token format, grid, prefix tokens, width)
  so PEFT modules can reshape tokens to the real grid instead of guessing ``sqrt(N - 1)``;
* returns multi-level NCHW features from chosen blocks for dense heads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

__all__ = ["BackboneError", "BlockInfo", "FrozenBackbone", "as_plain_tensor", "create_backbone"]

INIT_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
BLOCK_NAME = re.compile(r"^(?:.*\.)?blocks\.\d+$")


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI ``MetaTensor`` metadata: tracking it through every op slows a ViT forward ~10x on the CPU."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class BackboneError(ValueError):
    """Raised for an unknown backbone, unusable weights or an input the backbone cannot take."""


@dataclass(frozen=True)
class BlockInfo:
    """Token layout seen at the input of one transformer block.

    Attributes:
        index: global block index (0-based, in forward order across all stages).
        name: module name inside the timm model (e.g. ``blocks.3`` or ``layers.1.blocks.0``).
        token_format: ``"nlc"`` (ViT: ``(B, prefix + H*W, C)``, patch tokens in raster order),
            ``"nhwc"`` (Swin: ``(B, H, W, C)``) or ``"unrolled"`` (Hiera: ``(B, H*W, C)`` in
            mask-unit order, not raster order).
        grid: token grid ``(H, W)`` of the patch tokens.
        num_prefix_tokens: class/register tokens in front of the patch tokens (``"nlc"`` only).
        width: channel width ``C``.
    """

    index: int
    name: str
    token_format: str
    grid: tuple[int, int]
    num_prefix_tokens: int
    width: int


def _family(model: nn.Module) -> str:
    cls = type(model).__name__.lower()
    if "hiera" in cls:
        return "hiera"
    if "swin" in cls:
        return "swin"
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return "vit"
    raise BackboneError(
        f"timm model class {type(model).__name__} is not a supported family; "
        "use a ViT (incl. DINOv2/CLIP/register variants), Swin or Hiera/SAM2-Hiera model."
    )


def _read_state_dict(path: Path) -> dict:
    """Read a weights file into a flat ``{name: tensor}`` dict (unwrapping common checkpoint keys)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if suffix == ".npz":
        raise AssertionError("npz is loaded by timm's own loader")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class FrozenBackbone(nn.Module):
    """A frozen timm encoder with its token layout and multi-level features.

    Args:
        name: timm model name, e.g. ``vit_small_patch16_224``, ``vit_base_patch14_reg4_dinov2``,
            ``swin_tiny_patch4_window7_224``, ``hiera_tiny_224``, ``sam2_hiera_tiny``.
        weights: ``None`` / ``"none"`` (random init, always seeded with ``INIT_SEED`` so that adapter
            artefacts trained on it can be reloaded onto an identical backbone), ``"hub"`` (timm
            pretrained, needs network) or a path to a local weights file.
        image_size: input side (int) or ``(H, W)``; position embeddings are resampled to it.
        in_chans: input channels; 1-channel medical images keep one channel and pretrained RGB
            patch-embedding weights are summed into it by timm.
        freeze: freeze every backbone parameter (default).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``depth`` for tiny
            test models, ``dynamic_img_size``).
    """

    def __init__(
        self,
        name: str,
        weights: str | os.PathLike | None = None,
        image_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        freeze: bool = True,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise BackboneError(
                f"Unknown timm backbone {name!r}. Pick a name from timm.list_models(); "
                f"similar names: {', '.join(close) or 'none'}."
            )
        if in_chans < 1:
            raise BackboneError(f"in_chans must be >= 1, got {in_chans}.")
        self.name = name
        self.in_chans = int(in_chans)
        kwargs = dict(model_kwargs or {})
        kwargs["num_classes"] = 0
        kwargs["in_chans"] = self.in_chans
        size = None
        if image_size is not None:
            size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(s) for s in image_size)
            kwargs["img_size"] = size
        weights = None if weights in (None, "", "none", "None") else weights
        self.weights = None if weights is None else str(weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)  # weights=None: the same reproducible random backbone everywhere
            self.model = self._create(name, pretrained=weights == "hub", kwargs=kwargs)
        if weights not in (None, "hub"):
            self._load_local(Path(weights))
        self.family = _family(self.model)
        self.image_size = size or self._default_image_size()
        self.blocks = self._trace_blocks()
        if freeze:
            self.requires_grad_(False)

    @staticmethod
    def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            # SAM2-Hiera (HieraDet) interpolates its position embedding to any input: no img_size argument.
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return timm.create_model(name, pretrained=pretrained, **kwargs)

    # ------------------------------------------------------------------ weights
    def _load_local(self, path: Path) -> None:
        """Load a local weights file through timm's own pretrained-loading path (filters, resampling)."""
        if not path.is_file():
            raise BackboneError(f"Backbone weights file not found: {path}. Give an existing file or weights=None.")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise BackboneError(f"Unsupported weights file {path.name}; use one of {', '.join(WEIGHT_SUFFIXES)}.")
        if path.suffix.lower() == ".npz":
            if not hasattr(self.model, "load_pretrained"):
                raise BackboneError(f".npz weights are only readable for ViT models, not {self.name}.")
            try:
                self.model.load_pretrained(str(path))
            except (KeyError, RuntimeError, ValueError) as err:
                raise BackboneError(f"{path.name} does not fit backbone {self.name!r}: {err}") from err
            return
        state = _read_state_dict(path)
        filter_fn = getattr(__import__(type(self.model).__module__, fromlist=["checkpoint_filter_fn"]),
                            "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state = filter_fn(state, self.model)
            except Exception as err:  # timm filters fail with assorted errors on foreign checkpoints
                raise BackboneError(
                    f"{path.name} could not be converted for backbone {self.name!r} ({type(err).__name__}: {err}). "
                    "Is it a checkpoint for another architecture?"
                ) from err
        state = self._fit_input_conv(state)
        head_keys = [k for k in state if k.startswith(("head.", "fc_norm.")) and k not in self.model.state_dict()]
        for k in head_keys:
            state.pop(k)
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or mismatched:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
            if mismatched:
                k = mismatched[0]
                parts.append(
                    f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} "
                    f"vs model {tuple(expected[k].shape)})"
                )
            raise BackboneError(
                f"Weights file {path.name} does not match backbone {self.name!r}: {'; '.join(parts)}. "
                "Check that `name` is the architecture the file was saved from."
            )
        self.model.load_state_dict(state, strict=True)

    def _fit_input_conv(self, state: dict) -> dict:
        """Fold a pretrained RGB patch-embedding kernel into ``in_chans`` channels (timm's adapt_input_conv)."""
        from timm.models import adapt_input_conv

        for key, ref in self.model.state_dict().items():
            if key.endswith("proj.weight") and "patch_embed" in key and key in state:
                w = state[key]
                if w.ndim == 4 and w.shape[1] != ref.shape[1]:
                    state[key] = adapt_input_conv(ref.shape[1], w)
        return state

    # ------------------------------------------------------------------ layout
    def _default_image_size(self) -> tuple[int, int]:
        pe = getattr(self.model, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        if size is None:
            cfg = getattr(self.model, "pretrained_cfg", {}) or {}
            size = cfg.get("input_size", (3, 224, 224))[1:]
        return (int(size[0]), int(size[1]))

    @property
    def patch_size(self) -> tuple[int, int]:
        pe = self.model.patch_embed
        ps = getattr(pe, "patch_size", None)
        if ps is None:  # Hiera: stride of its patch convolution
            ps = pe.proj.stride
        return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch-token grid after the patch embedding."""
        return self.blocks[0].grid

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def stage_widths(self) -> list[int]:
        """Channel width per block (constant for ViT, growing per stage for Swin/Hiera)."""
        return [b.width for b in self.blocks]

    def _block_modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if BLOCK_NAME.match(n)]

    def _trace_blocks(self) -> list[BlockInfo]:
        """Run one dummy image and record the token shape entering every block."""
        shapes: dict[str, tuple[int, ...]] = {}
        handles = []
        modules = self._block_modules()
        for name, mod in modules:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))))
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                self.model.forward_features(torch.zeros(1, self.in_chans, *self.image_size))
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        ph, pw = self.patch_size
        base_h, base_w = self.image_size[0] // ph, self.image_size[1] // pw
        infos = []
        for i, (name, _) in enumerate(modules):
            shape = shapes[name]
            if len(shape) == 4:
                fmt, grid, prefix, width = "nhwc", (shape[1], shape[2]), 0, shape[3]
            elif self.family == "hiera":
                n = shape[1]
                scale = (n / (base_h * base_w)) ** 0.5
                fmt, grid, prefix, width = "unrolled", (round(base_h * scale), round(base_w * scale)), 0, shape[2]
            else:
                prefix = self.num_prefix_tokens
                fmt, grid, width = "nlc", self._vit_grid(), shape[2]
                if shape[1] != prefix + grid[0] * grid[1]:
                    raise BackboneError(f"{self.name}: block {name} sees {shape[1]} tokens, expected "
                                        f"{prefix} prefix + {grid[0]}x{grid[1]} patch tokens.")
            infos.append(BlockInfo(i, name, fmt, (int(grid[0]), int(grid[1])), int(prefix), int(width)))
        return infos

    def _vit_grid(self) -> tuple[int, int]:
        g = self.model.patch_embed.grid_size
        return (int(g[0]), int(g[1]))

    def block_module(self, index: int) -> nn.Module:
        return self.model.get_submodule(self.blocks[index].name)

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise BackboneError(f"{self.name} expects a (B, C, H, W) batch, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_chans:
            raise BackboneError(
                f"{self.name} was built for {self.in_chans} input channel(s) but got {x.shape[1]}. "
                f"Set in_chans={x.shape[1]} on the network, or convert the images "
                "(e.g. RepeatChannel / a channel-selecting transform) in preprocessing."
            )

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised tokens (``forward_features`` of the timm model)."""
        self.check_input(x)
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled image embedding ``(B, num_features)`` (timm's pre-logits)."""
        return self.model.forward_head(self.forward_tokens(x), pre_logits=True)

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """NCHW features from the given block indices (negative indices count from the end)."""
        self.check_input(x)
        n = len(self.blocks)
        idx = sorted({i % n for i in indices})
        if self.family == "vit":
            return self.model.forward_intermediates(x, indices=idx, output_fmt="NCHW", intermediates_only=True)
        return self._forward_levels_hooked(x, idx)

    def _forward_levels_hooked(self, x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        """Hierarchical backbones: capture block outputs with hooks and return them as NCHW."""
        outs: dict[int, torch.Tensor] = {}
        handles = []
        for i in idx:
            info = self.blocks[i]
            out_info = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            handles.append(self.block_module(i).register_forward_hook(
                lambda m, a, y, i=i: outs.__setitem__(i, y)))
            del info, out_info
        try:
            self.model.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        feats = []
        for i in idx:
            y = outs[i]
            if y.ndim == 4:  # Swin NHWC
                feats.append(y.permute(0, 3, 1, 2).contiguous())
            else:  # Hiera unrolled tokens -> raster NHWC via the model's reroll
                feats.append(self._hiera_to_nchw(y, i))
        return feats

    def _hiera_to_nchw(self, y: torch.Tensor, i: int) -> torch.Tensor:
        reroll = self.model.reroll
        # timm's Reroll maps a block index to the stage its output belongs to.
        out = reroll(y, i)
        return out.permute(0, 3, 1, 2).contiguous()


def create_backbone(name: str, **kwargs) -> FrozenBackbone:
    """Functional alias of :class:`FrozenBackbone` for bundle configs."""
    return FrozenBackbone(name, **kwargs)
