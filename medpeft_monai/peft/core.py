"""The one PEFT injection core every method in this project goes through.

A method is a :class:`PeftConfig` subclass registered under a ``method`` name. Its
:meth:`PeftConfig.inject` wraps or inserts modules (subclasses of :class:`PeftModule`) into a
:class:`~medpeft_monai.backbones.FrozenBackbone`, and :meth:`PeftConfig.mark_trainable` may unfreeze
backbone parameters (BitFit, full fine-tuning). :func:`apply_peft` runs both after freezing the
backbone, so the trainable set is always "injected modules + what the method unfreezes + the head".

Adapter-only checkpoints hold exactly the trainable parameters, the backbone name and the method
config (:func:`peft_state_dict`); :func:`load_peft_state_dict` refuses a payload made for another
backbone or method.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone
from medpeft_monai.utils import atomic_path

__all__ = [
    "PEFT_FORMAT",
    "PeftConfig",
    "PeftError",
    "PeftModule",
    "apply_peft",
    "count_parameters",
    "find_backbone",
    "load_peft_state_dict",
    "merge_peft",
    "param_groups",
    "peft_config",
    "peft_state_dict",
    "register_method",
    "save_atomic",
    "select_blocks",
    "unmerge_peft",
]

PEFT_FORMAT = "medpeft_monai.peft/1"
METHODS: dict[str, type[PeftConfig]] = {}


class PeftError(ValueError):
    """Raised for an unusable PEFT config, target selection or adapter checkpoint."""


class PeftModule(nn.Module):
    """Base class of every module a PEFT method injects.

    Subclasses that can be folded into the frozen weights override :meth:`merge` / :meth:`unmerge`.
    """

    mergeable: ClassVar[bool] = False

    def merge(self) -> None:
        raise PeftError(f"{type(self).__name__} is non-linear in its input and cannot be merged into the backbone.")

    def unmerge(self) -> None:
        raise PeftError(f"{type(self).__name__} cannot be unmerged.")


@dataclass
class PeftConfig:
    """Common settings of every method.

    Args:
        blocks: indices of the transformer blocks to adapt (negative counts from the end);
            ``None`` adapts every block.
    """

    method: ClassVar[str] = ""
    blocks: list[int] | None = None

    def inject(self, backbone: FrozenBackbone) -> None:
        """Insert this method's modules into ``backbone`` (in place). Default: nothing."""

    def mark_trainable(self, backbone: FrozenBackbone) -> None:
        """Unfreeze backbone parameters the method trains in place (BitFit, full). Default: none."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


def register_method(cls: type[PeftConfig]) -> type[PeftConfig]:
    """Class decorator: make a config class reachable by its ``method`` name."""
    if not cls.method:
        raise TypeError(f"{cls.__name__} needs a `method` name.")
    METHODS[cls.method] = cls
    return cls


def peft_config(spec: str | dict | PeftConfig | None) -> PeftConfig:
    """Build a config from a method name, a dict with a ``method`` key (as in bundle JSON) or a config."""
    if isinstance(spec, PeftConfig):
        return spec
    if spec is None:
        spec = "linear_probe"
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict) or "method" not in spec:
        raise PeftError(f"A PEFT config must be a method name or a dict with a 'method' key, got {spec!r}.")
    spec = dict(spec)
    name = spec.pop("method")
    if name not in METHODS:
        raise PeftError(f"Unknown PEFT method {name!r}; available: {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise PeftError(f"PEFT method {name!r} has no option(s) {unknown}; its options are {sorted(known)}.")
    return cls(**spec)


def select_blocks(backbone: FrozenBackbone, blocks: list[int] | None) -> list[int]:
    """Resolve block indices (``None`` = all, negatives from the end) with a clear range error."""
    n = len(backbone.blocks)
    if blocks is None:
        return list(range(n))
    out = []
    for b in blocks:
        if not -n <= int(b) < n:
            raise PeftError(f"Block index {b} is out of range: {backbone.name} has {n} blocks (0..{n - 1}).")
        out.append(int(b) % n)
    return sorted(set(out))


def find_targets(backbone: FrozenBackbone, pattern: str, blocks: list[int] | None) -> list[str]:
    """Names of modules inside the selected blocks whose block-relative name matches ``pattern``.

    For example ``pattern=r"attn\\.qkv"`` with ``blocks=[0, -1]`` selects ``blocks.0.attn.qkv`` and the
    last block's ``qkv``. Raises when nothing matches, naming what the blocks do contain.
    """
    regex = re.compile(pattern)
    names = []
    for i in select_blocks(backbone, blocks):
        prefix = backbone.blocks[i].name
        block = backbone.model.get_submodule(prefix)
        for sub, _ in block.named_modules():
            if sub and regex.fullmatch(sub):
                names.append(f"{prefix}.{sub}")
    if not names:
        example = [n for n, _ in backbone.block_module(0).named_modules() if n][:12]
        raise PeftError(f"No module matches {pattern!r} in the selected blocks of {backbone.name}; "
                        f"block modules are named like {example}.")
    return names


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set ``root.<name> = new`` for a dotted module name."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_peft(backbone: FrozenBackbone, config: str | dict | PeftConfig | None) -> PeftConfig:
    """Freeze ``backbone``, inject the method's modules and unfreeze what the method trains."""
    if getattr(backbone, "peft_config", None) is not None:
        raise PeftError(f"{backbone.name} already carries PEFT method {backbone.peft_config.method!r}.")
    config = peft_config(config)
    backbone.requires_grad_(False)
    config.inject(backbone)
    config.mark_trainable(backbone)
    backbone.peft_config = config
    return config


def find_backbone(model: nn.Module) -> FrozenBackbone:
    if isinstance(model, FrozenBackbone):
        return model
    for m in model.modules():
        if isinstance(m, FrozenBackbone):
            return m
    raise PeftError(f"{type(model).__name__} contains no FrozenBackbone.")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def peft_state_dict(model: nn.Module) -> dict[str, Any]:
    """The adapter artefact: trainable parameters only, with the backbone name and method config.

    Returns ``{"format", "backbone", "method", "state_dict", "trainable", "total"}``.
    """
    backbone = find_backbone(model)
    config = getattr(backbone, "peft_config", None)
    if config is None:
        raise PeftError("The model has no PEFT method applied; call apply_peft first.")
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainable, total = count_parameters(model)
    return {"format": PEFT_FORMAT, "backbone": backbone.name, "in_chans": backbone.in_chans,
            "method": config.to_dict(), "state_dict": state, "trainable": trainable, "total": total}


def load_peft_state_dict(model: nn.Module, payload: dict[str, Any] | str | os.PathLike) -> None:
    """Load an adapter artefact made by :func:`peft_state_dict` (a dict or a file path).

    Refuses, with the reason and the fix, a payload for another backbone, another method or
    method config, or whose parameter names/shapes do not fit the model.
    """
    source = "adapter state"
    if isinstance(payload, (str, os.PathLike)):
        source = str(payload)
        if not os.path.isfile(source):
            raise PeftError(f"Adapter file not found: {source}.")
        payload = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != PEFT_FORMAT:
        raise PeftError(f"{source} is not a medpeft_monai adapter artefact (expected format {PEFT_FORMAT!r}); "
                        "full checkpoints load with `model.load_state_dict` instead.")
    backbone = find_backbone(model)
    if payload["backbone"] != backbone.name:
        raise PeftError(f"{source} was trained on backbone {payload['backbone']!r}, but this model uses "
                        f"{backbone.name!r}. Build the network with backbone={payload['backbone']!r}.")
    mine = backbone.peft_config.to_dict()
    if payload["method"] != mine:
        diff = {k: (payload["method"].get(k), mine.get(k)) for k in set(payload["method"]) | set(mine)
                if payload["method"].get(k) != mine.get(k)}
        raise PeftError(f"{source} was made with PEFT config {payload['method']} but this model uses {mine}; "
                        f"differences (file, model): {diff}. Build the network with the file's config.")
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = payload["state_dict"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PeftError(f"{source} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    for n, p in expected.items():
        if p.shape != state[n].shape:
            raise PeftError(f"{source}: {n} has shape {tuple(state[n].shape)} but the model expects "
                            f"{tuple(p.shape)} (e.g. a different num_classes or adapter width).")
    with torch.no_grad():
        for n, p in expected.items():
            p.copy_(state[n])


def _peft_modules(model: nn.Module) -> list[PeftModule]:
    return [m for m in model.modules() if isinstance(m, PeftModule)]


def merge_peft(model: nn.Module) -> nn.Module:
    """Switch every injected module to its merged inference form (outputs unchanged) and return ``model``.

    LoRA folds into the frozen weights; DKA swaps its two depthwise branches for one cropped kernel.
    """
    mods = _peft_modules(model)
    blocked = sorted({type(m).__name__ for m in mods if not m.mergeable})
    if blocked:
        raise PeftError(f"Cannot merge: {', '.join(blocked)} are not linear in their input.")
    for m in mods:
        m.merge()
    return model


def unmerge_peft(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_peft` and return ``model``."""
    for m in _peft_modules(model):
        m.unmerge()
    return model


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`medpeft_monai.utils.atomic_path`: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def param_groups(model: nn.Module, adapter_lr: float = 1e-3, head_lr: float = 1e-4,
                 weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups with separate learning rates for the adapter and the head.

    The "adapter" group holds the trainable parameters inside the model's
    :class:`~medpeft_monai.backbones.FrozenBackbone` (injected modules, or whatever the method unfroze);
    the "head" group every other trainable parameter (classifier head, decoder). Empty groups are left
    out. Works for any PEFT method, e.g. in a bundle config::

        "optimizer": {"_target_": "torch.optim.AdamW",
                      "params": "$medpeft_monai.peft.param_groups(@network, 1e-3, 1e-4)"}

    Args:
        model: a network containing a FrozenBackbone (or the backbone itself).
        adapter_lr: learning rate of the trainable backbone parameters (paper: 1e-3).
        head_lr: learning rate of the rest (paper: 1e-4).
        weight_decay: set on both groups; ``None`` keeps the optimizer's default.
    """
    backbone = find_backbone(model)
    in_backbone = {id(p) for p in backbone.parameters()}
    adapter, head, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (adapter if id(p) in in_backbone else head).append(p)
    groups = []
    for name, params, lr in (("adapter", adapter, adapter_lr), ("head", head, head_lr)):
        if params:
            group = {"params": params, "lr": float(lr), "name": name}
            if weight_decay is not None:
                group["weight_decay"] = float(weight_decay)
            groups.append(group)
    if not groups:
        raise PeftError("The model has no trainable parameters; apply a PEFT method or add a head.")
    return groups


# Baselines that inject nothing ---------------------------------------------------------------


@register_method
@dataclass
class LinearProbeConfig(PeftConfig):
    """Linear probing: the whole backbone stays frozen; only the task head trains."""

    method: ClassVar[str] = "linear_probe"


@register_method
@dataclass
class FullFinetuneConfig(PeftConfig):
    """Full fine-tuning: every backbone parameter trains (the upper-cost baseline)."""

    method: ClassVar[str] = "full"

    def mark_trainable(self, backbone: FrozenBackbone) -> None:
        backbone.requires_grad_(True)


@register_method
@dataclass
class BitFitConfig(PeftConfig):
    """BitFit (Ben Zaken et al. 2022): only bias terms of the selected blocks train."""

    method: ClassVar[str] = "bitfit"

    def mark_trainable(self, backbone: FrozenBackbone) -> None:
        for i in select_blocks(backbone, self.blocks):
            for name, p in backbone.block_module(i).named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
