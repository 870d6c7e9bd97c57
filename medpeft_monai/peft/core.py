"""The one PEFT injection core every method in this project goes through: named, stackable adapters.

In the style of HF peft's config -> tuner -> adapter-only state:

* A method is a :class:`PeftConfig` subclass registered under a ``method`` name (configs are data).
* :func:`apply_peft` ``(model, config, name="default", trainable=True, modules=())`` injects the method's
  modules (:class:`PeftModule` subclasses) under a **name**. Several adapters, of the same or of
  different methods, stack on one model; each keeps its own config and its own ``trainable`` switch
  (:func:`set_trainable`). ``modules`` names whole modules outside the backbone (a head, a decoder, a
  fusion module) that belong to the adapter. The adapters of a model live in its
  :class:`AdapterRegistry` (``model.peft_registry``), created by the first :func:`apply_peft`, which also
  freezes the backbone.
* Injection goes into the model's :class:`~medpeft_monai.backbones.FrozenBackbone` when it has one
  (token-layout aware: grids, prefix tokens, block selection), else into any plain ``nn.Module`` by a
  regex on module names (methods that support it, e.g. LoRA on MONAI's ``DiffusionModelUNet``).
* Wrappers name what they wrap (``PeftModule.wraps``); parameter names in an artefact are *canonical*:
  the wrapper hops are left out, so an adapter's names do not depend on what else is stacked on the
  model (a LoRA saved alone loads under prompts that wrap its blocks, and the other way round).
* :func:`peft_state_dict` / :func:`load_peft_state_dict` save and load exactly one adapter's tensors,
  trainable or frozen, with its identity: backbone name, ``image_size``, ``in_chans``, weights source and
  a fingerprint of the frozen weights. Loading onto other weights, another backbone, another method or
  config, or an adapter name the model does not have is refused with the reason and the fix.
* :func:`merge_peft` switches mergeable adapters to their merged inference form. Merged modules compute
  from their (unchanged) parameters, cached per parameter version, so ``merge -> load_state_dict ->
  forward`` and ``load -> merge -> forward`` both equal the trained network.
* :func:`unload` removes one adapter and puts the wrapped modules back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from medpeft_monai.backbones import FrozenBackbone, weights_fingerprint
from medpeft_monai.checkpoint import checked_file, torch_bytes, write_bytes_atomic

__all__ = [
    "PEFT_FORMAT",
    "AdapterEntry",
    "AdapterRegistry",
    "PeftConfig",
    "PeftError",
    "ParameterCache",
    "PeftModule",
    "adapter_parameters",
    "apply_peft",
    "count_parameters",
    "find_backbone",
    "find_targets",
    "get_registry",
    "load_peft_state_dict",
    "merge_peft",
    "param_groups",
    "peft_config",
    "peft_state_dict",
    "read_adapter",
    "register_method",
    "save_atomic",
    "select_blocks",
    "set_trainable",
    "unload",
    "unmerge_peft",
]

PEFT_FORMAT = "medpeft_monai.peft/2"
_OLD_FORMAT = "medpeft_monai.peft/1"  # single-adapter artefacts without identity: still readable
METHODS: dict[str, type[PeftConfig]] = {}
logger = logging.getLogger(__name__)


class PeftError(ValueError):
    """Raised for an unusable PEFT config, target selection or adapter checkpoint."""


class PeftModule(nn.Module):
    """Base class of every module a PEFT method injects.

    Class attributes:
        wraps: attribute names holding frozen modules this one wraps, the wrapped module first
            (e.g. ``("base",)`` for LoRA around a linear layer); ``()`` for modules that wrap nothing.
            Parameters under these attributes are not the adapter's, and the first one is left out of
            canonical names.
        mergeable: the module has an exact merged inference form (:meth:`merge` / :meth:`unmerge`).

    ``adapter_name`` is set by :func:`apply_peft` on every module it injects.
    """

    mergeable: ClassVar[bool] = False
    wraps: ClassVar[tuple[str, ...]] = ()
    adapter_name: str | None = None

    @property
    def takes_context(self) -> bool:
        """Whether ``forward`` takes the backbone's per-forward ``context`` (wrappers pass it on)."""
        return bool(self.wraps) and bool(getattr(getattr(self, self.wraps[0]), "takes_context", False))

    def merge(self) -> None:
        raise PeftError(f"{type(self).__name__} is non-linear in its input and cannot be merged into the backbone.")

    def unmerge(self) -> None:
        raise PeftError(f"{type(self).__name__} cannot be unmerged.")

    def own_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(relative name, parameter)`` of the adapter's own parameters (not those of wrapped modules)."""
        return ((n, p) for n, p in self.named_parameters() if n.split(".", 1)[0] not in self.wraps)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of own parameters to keep out of weight decay."""
        return set()

    def restore(self, parent: nn.Module, attr: str) -> None:
        """Undo the injection: put the wrapped module back at ``parent.<attr>`` (or just remove this one)."""
        if self.wraps:
            setattr(parent, attr, getattr(self, self.wraps[0]))
        else:
            delattr(parent, attr)


class ParameterCache:
    """A value derived from parameters (a merged weight or kernel), recomputed when any of them changes.

    In-place updates (optimizer steps, ``load_state_dict``) bump a tensor's ``_version``; a new tensor has
    a new ``data_ptr``; both are in the key, with any ``extra`` (grid, dtype, device). Not used while
    tracing, so ``torch.jit.trace`` records the computation. Safe under threads: the entry is read and
    replaced as one object, and two threads that both miss compute the same value.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, params: list[torch.Tensor], compute, *extra):
        if torch.jit.is_tracing():
            return compute()
        key = (tuple(p._version for p in params), tuple(p.data_ptr() for p in params), extra)
        entry = self._entry
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, compute())
            self._entry = entry
        return entry[1]

    def clear(self) -> None:
        self._entry = None


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

    def inject_module(self, root: nn.Module) -> None:
        """Insert this method's modules into a plain module (no FrozenBackbone), by module-name pattern."""
        raise PeftError(f"PEFT method {self.method!r} needs a FrozenBackbone (token layout); wrap the model in a "
                        "FrozenBackbone-based network, or use a method that targets modules by name (e.g. lora).")

    def base_parameters(self, backbone: FrozenBackbone) -> Iterator[nn.Parameter]:
        """Backbone parameters the method trains in place (BitFit, full). Default: none."""
        return iter(())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class AdapterEntry:
    """One named adapter of a model: its config, whether it trains, and the whole modules it owns."""

    config: PeftConfig
    trainable: bool = True
    modules: tuple[str, ...] = ()


@dataclass
class AdapterRegistry:
    """The adapters of a model (``model.peft_registry``), in the order they were applied.

    ``identity`` holds the base model's identity for plain modules (for a FrozenBackbone it is read from
    the backbone): ``{"backbone": class name, "fingerprint": ...}``.
    """

    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    identity: dict[str, Any] | None = None


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


# ---------------------------------------------------------------------------------------------- names


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_Site = tuple[str, str, nn.Module, "nn.Module | None", str]


def _walk(module: nn.Module, internals: bool = True, canon: str = "", real: str = "",
          parent: nn.Module | None = None, attr: str = "") -> Iterator[_Site]:
    """``(canonical name, real name, module, parent, attribute)`` for ``module`` and its descendants.

    The canonical name leaves out every wrapper hop (``PeftModule.wraps[0]``), so a wrapper and what it
    wraps share one canonical name (the wrapper comes first). ``internals=False`` does not descend into
    an adapter's own sub-modules (only into what it wraps).
    """
    yield canon, real, module, parent, attr
    wraps = module.wraps if isinstance(module, PeftModule) else ()
    for name, child in module._modules.items():
        if child is None:
            continue
        if isinstance(module, PeftModule) and name not in wraps and not internals:
            continue
        c = canon if wraps and name == wraps[0] else _join(canon, name)
        yield from _walk(child, internals, c, _join(real, name), module, name)


def canonical_name(root: nn.Module, real: str) -> str:
    """The canonical (wrapper-free) name of the module or parameter at dotted path ``real`` under ``root``."""
    module, out = root, []
    for part in real.split(".") if real else []:
        wraps = module.wraps if isinstance(module, PeftModule) else ()
        if not (wraps and part == wraps[0]):
            out.append(part)
        module = getattr(module, part)
    return ".".join(out)


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


def _targets(root: nn.Module, pattern: str, prefix: str = "") -> list[str]:
    """Real names of the outermost modules whose canonical name (relative to ``root``) fully matches ``pattern``."""
    regex = re.compile(pattern)
    seen, names = set(), []
    for canon, real, _, _, _ in _walk(root, internals=False):
        if canon and canon not in seen and regex.fullmatch(canon):
            names.append(_join(prefix, real))
        seen.add(canon)
    return names


def find_targets(backbone: FrozenBackbone, pattern: str, blocks: list[int] | None) -> list[str]:
    r"""Names (in ``backbone.model``) of modules inside the selected blocks whose block-relative name matches.

    For example ``pattern=r"attn\.qkv"`` with ``blocks=[0, -1]`` selects ``blocks.0.attn.qkv`` and the
    last block's ``qkv``. Names are matched wrapper-free, so an earlier adapter around a block or a layer
    does not hide it; the outermost module at each match is returned (wrapping it stacks). Raises when
    nothing matches, naming what the blocks do contain.
    """
    names = []
    for i in select_blocks(backbone, blocks):
        site = backbone.blocks[i].name
        names += _targets(backbone.model.get_submodule(site), pattern, prefix=site)
    if not names:
        example = [c for c, *_ in _walk(backbone.block_module(0), internals=False) if c][:12]
        raise PeftError(f"No module matches {pattern!r} in the selected blocks of {backbone.name}; "
                        f"block modules are named like {example}.")
    return names


def find_module_targets(root: nn.Module, pattern: str) -> list[str]:
    """Names of modules of a plain model whose (wrapper-free) name fully matches ``pattern``."""
    names = _targets(root, pattern)
    if not names:
        example = [c for c, *_ in _walk(root, internals=False) if c][:12]
        raise PeftError(f"No module of {type(root).__name__} matches {pattern!r}; modules are named like {example}.")
    return names


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set ``root.<name> = new`` for a dotted module name."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------------- registry


def find_backbone(model: nn.Module) -> FrozenBackbone:
    if isinstance(model, FrozenBackbone):
        return model
    for m in model.modules():
        if isinstance(m, FrozenBackbone):
            return m
    raise PeftError(f"{type(model).__name__} contains no FrozenBackbone.")


def _maybe_backbone(model: nn.Module) -> FrozenBackbone | None:
    return next((m for m in model.modules() if isinstance(m, FrozenBackbone)), None)


def _owner(model: nn.Module) -> nn.Module:
    """The module holding the adapter registry (``model`` itself, or the first one inside, e.g. under DDP)."""
    for m in model.modules():
        if isinstance(getattr(m, "peft_registry", None), AdapterRegistry):
            return m
    raise PeftError(f"{type(model).__name__} has no PEFT adapter; call apply_peft(model, config) first.")


def get_registry(model: nn.Module) -> AdapterRegistry:
    """The model's :class:`AdapterRegistry` (raises if no adapter was applied)."""
    return _owner(model).peft_registry


def _entry(model: nn.Module, name: str) -> tuple[nn.Module, AdapterEntry]:
    owner = _owner(model)
    adapters = owner.peft_registry.adapters
    if name not in adapters:
        raise PeftError(f"The model has no adapter named {name!r}; its adapters are {list(adapters)}. "
                        "Use one of those names, or add it with apply_peft(model, config, name=...).")
    return owner, adapters[name]


def apply_peft(model: nn.Module, config: str | dict | PeftConfig | None, name: str = "default",
               trainable: bool = True, modules: tuple[str, ...] | list[str] = ()) -> PeftConfig:
    """Add adapter ``name`` with ``config`` to ``model`` and return the config.

    Args:
        model: a network holding a FrozenBackbone (or the backbone itself), or any plain ``nn.Module``.
        config: method name, dict with a ``method`` key (as in bundle JSON) or a :class:`PeftConfig`.
        name: the adapter's name; several adapters stack, each under its own name.
        trainable: whether the adapter's parameters train (``False``: e.g. a reused frozen modality LoRA).
        modules: names (relative to ``model``) of whole modules that belong to this adapter, e.g. the
            network's head or decoder: trained, switched and saved with it.

    The first call freezes the backbone (for a plain module: all its current parameters).
    """
    config = peft_config(config)
    registry = model.__dict__.get("peft_registry")
    backbone = _maybe_backbone(model)
    if registry is None:
        registry = AdapterRegistry()
        (backbone if backbone is not None else model).requires_grad_(False)
        if backbone is None:
            params = list(model.named_parameters())
            picks = params[:2] + params[len(params) // 2:len(params) // 2 + 1] + params[-2:]
            registry.identity = {"backbone": type(model).__name__, "fingerprint": weights_fingerprint(picks)}
    if name in registry.adapters:
        raise PeftError(f"The model already has an adapter named {name!r} "
                        f"({registry.adapters[name].config.method}); pick another name or unload({name!r}) first.")
    for mod in modules:
        try:
            model.get_submodule(mod)
        except AttributeError as err:
            raise PeftError(f"modules: {type(model).__name__} has no sub-module {mod!r}.") from err
    before = {id(m) for m in model.modules()}
    if backbone is not None:
        config.inject(backbone)
    else:
        config.inject_module(model)
    for m in model.modules():
        if id(m) not in before and isinstance(m, PeftModule):
            m.adapter_name = name
    registry.adapters[name] = AdapterEntry(config, bool(trainable), tuple(modules))
    model.peft_registry = registry
    set_trainable(model, name, trainable)
    return config


def _adapter_param_ids(owner: nn.Module, name: str, entry: AdapterEntry) -> set[int]:
    ids = set()
    for m in owner.modules():
        if isinstance(m, PeftModule) and m.adapter_name == name:
            ids |= {id(p) for _, p in m.own_parameters()}
    for mod in entry.modules:
        ids |= {id(p) for p in owner.get_submodule(mod).parameters()}
    backbone = _maybe_backbone(owner)
    if backbone is not None:
        ids |= {id(p) for p in entry.config.base_parameters(backbone)}
    return ids


def adapter_parameters(model: nn.Module, name: str = "default") -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name`` under their canonical (wrapper-free) names, in model order."""
    owner, entry = _entry(model, name)
    ids = _adapter_param_ids(owner, name, entry)
    out: dict[str, nn.Parameter] = {}
    for canon, _, module, _, _ in _walk(owner):
        for pname, p in module._parameters.items():
            if p is not None and id(p) in ids:
                out.setdefault(_join(canon, pname), p)
    return out


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Switch adapter ``name`` between training (``requires_grad``) and frozen."""
    owner, entry = _entry(model, name)
    for p in adapter_parameters(owner, name).values():
        p.requires_grad_(bool(trainable))
    entry.trainable = bool(trainable)


def unload(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``: its wrappers give back what they wrap; its modules and registry entry go.

    Backbone parameters that a method trained in place (BitFit, full) are frozen again but keep their
    trained values; modules listed in ``modules`` (heads) stay in the network.
    """
    owner, entry = _entry(model, name)
    for p in entry.config.base_parameters(find_backbone(owner)) if _maybe_backbone(owner) is not None else ():
        p.requires_grad_(False)
    sites = [(parent, attr, m) for _, _, m, parent, attr in _walk(owner)
             if isinstance(m, PeftModule) and m.adapter_name == name and parent is not None
             and getattr(parent, "adapter_name", None) != name]
    for parent, attr, m in sites:
        m.restore(parent, attr)
    del owner.peft_registry.adapters[name]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------- artefacts


def _identity(owner: nn.Module) -> dict[str, Any]:
    """Backbone name, image size, channels, weights source, weights fingerprint and input normalisation
    (``[mean, std]`` or ``None``) of the adapted model."""
    backbone = _maybe_backbone(owner)
    if backbone is None:
        return dict(owner.peft_registry.identity or {})
    norm = None if backbone.input_norm is None else [list(backbone.input_norm[0]), list(backbone.input_norm[1])]
    return {"backbone": backbone.name, "image_size": list(backbone.image_size), "in_chans": backbone.in_chans,
            "weights": backbone.weights_source, "fingerprint": backbone.fingerprint, "input_norm": norm}


def peft_state_dict(model: nn.Module, name: str = "default") -> dict[str, Any]:
    """The artefact of adapter ``name``: its tensors (trainable or frozen) and what they were made for.

    Returns ``{"format", "name", "method", "trainable", "modules", "backbone", "image_size", "in_chans",
    "weights", "fingerprint", "input_norm", "state_dict", "num_parameters", "total"}``; ``state_dict`` keys
    are canonical names, ``modules`` the whole modules (head, decoder) the adapter owns.
    """
    owner, entry = _entry(model, name)
    params = adapter_parameters(owner, name)
    state = {k: p.detach().cpu().clone() for k, p in params.items()}
    return {"format": PEFT_FORMAT, "name": name, "method": entry.config.to_dict(), "trainable": entry.trainable,
            "modules": [canonical_name(owner, m) for m in entry.modules], **_identity(owner), "state_dict": state,
            "num_parameters": sum(t.numel() for t in state.values()), "total": count_parameters(owner)[1]}


def _read_payload(payload: dict[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    source = "adapter state"
    if isinstance(payload, (str, os.PathLike)):
        source = str(payload)
        if not os.path.isfile(source):
            raise PeftError(f"Adapter file not found: {source}.")
        checked_file(source)  # complete and, if a training run saved it, the file its checkpoint manifest records
        try:
            payload = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated / not a torch file
            raise PeftError(f"{source} could not be read as an adapter artefact ({type(err).__name__}: {err}). "
                            "Is the file complete? Re-save it with peft_state_dict.") from err
    if not isinstance(payload, dict) or payload.get("format") not in (PEFT_FORMAT, _OLD_FORMAT):
        raise PeftError(f"{source} is not a medpeft_monai adapter artefact (expected format {PEFT_FORMAT!r}); "
                        "full checkpoints load with `model.load_state_dict` instead.")
    return payload, source


def read_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Read an adapter artefact file (checked to be one) without loading it into a model, e.g. to build
    the adapter from its recorded ``method`` config before :func:`load_peft_state_dict`."""
    return _read_payload(path)[0]


def _check_identity(payload: dict[str, Any], mine: dict[str, Any], source: str) -> None:
    if payload.get("backbone") != mine.get("backbone"):
        raise PeftError(f"{source} was trained on backbone {payload.get('backbone')!r}, but this model uses "
                        f"{mine.get('backbone')!r}. Build the network with backbone={payload.get('backbone')!r}.")
    if "in_chans" in payload and "in_chans" in mine and int(payload["in_chans"]) != int(mine["in_chans"]):
        raise PeftError(f"{source} was trained with in_chans={payload['in_chans']}, but this model takes "
                        f"in_chans={mine['in_chans']}. Build the network with in_chans={payload['in_chans']}.")
    if payload.get("fingerprint") is None:
        logger.warning(f"{source} records no weights fingerprint (older format); its backbone weights are not checked.")
    elif payload["fingerprint"] != mine.get("fingerprint"):
        raise PeftError(
            f"{source} was trained on other backbone weights: it expects {payload.get('backbone')!r} weights "
            f"{payload.get('weights', '?')!r} (fingerprint {payload['fingerprint']}), but this model has weights "
            f"{mine.get('weights', '?')!r} (fingerprint {mine.get('fingerprint')}). Build the network with "
            f"weights={payload.get('weights', '?')!r} (the same file or source the adapter was trained on).")
    if "input_norm" in payload and "input_norm" in mine and payload["input_norm"] != mine["input_norm"]:
        raise PeftError(f"{source} was trained on inputs normalised with (mean, std) {payload['input_norm']}, but "
                        f"this model normalises with {mine['input_norm']}. Build the network with "
                        f"input_norm={payload['input_norm']} (or the weights' default, input_norm='auto').")
    if payload.get("image_size") and mine.get("image_size") and list(payload["image_size"]) != mine["image_size"]:
        logger.warning(f"{source} was trained at image_size {payload['image_size']}; this model uses "
                       f"{mine['image_size']}.")


def load_peft_state_dict(model: nn.Module, payload: dict[str, Any] | str | os.PathLike,
                         name: str = "default") -> None:
    """Load an artefact made by :func:`peft_state_dict` (a dict or a file path) into adapter ``name``.

    Refuses, with the reason and the fix: an adapter name the model does not have, another backbone,
    other backbone weights (fingerprint) or channel count, another method or method config, and
    tensors whose names or shapes do not fit. The adapter keeps its ``trainable`` switch. Tensors of
    whole modules the file's adapter owned but adapter ``name`` does not (a head, a decoder) are not
    loaded, so a LoRA trained in one network can be reused as a named adapter in another.
    """
    payload, source = _read_payload(payload)
    owner, entry = _entry(model, name)
    _check_identity(payload, _identity(owner), source)
    mine = entry.config.to_dict()
    if payload["method"] != mine:
        diff = {k: (payload["method"].get(k), mine.get(k)) for k in set(payload["method"]) | set(mine)
                if payload["method"].get(k) != mine.get(k)}
        same = [n for n, e in owner.peft_registry.adapters.items() if e.config.to_dict() == payload["method"]]
        hint = (f" The model's adapter(s) with that config: {same}." if same
                else " Build the network with the file's config.")
        raise PeftError(f"{source} holds a {payload['method'].get('method')!r} adapter made with config "
                        f"{payload['method']}, but adapter {name!r} of this model uses {mine}; differences "
                        f"(file, model): {diff}.{hint}")
    expected = adapter_parameters(owner, name)
    state = payload["state_dict"]
    mine_modules = {canonical_name(owner, m) for m in entry.modules}
    foreign = [m for m in payload.get("modules", []) if m not in mine_modules]
    if foreign:  # e.g. a LoRA trained with a segmenter's decoder, reused as a modality adapter elsewhere
        logger.info(f"{source}: not loading the tensors of {foreign} (not part of adapter {name!r} here).")
        state = {k: v for k, v in state.items() if not any(k == m or k.startswith(m + ".") for m in foreign)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PeftError(f"{source} does not fit adapter {name!r} of this model: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}.")
    for n, p in expected.items():
        if p.shape != state[n].shape:
            raise PeftError(f"{source}: {n} has shape {tuple(state[n].shape)} but the model expects "
                            f"{tuple(p.shape)} (e.g. a different num_classes or adapter width).")
    with torch.no_grad():
        for n, p in expected.items():
            p.copy_(state[n])


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`medpeft_monai.utils.atomic_path`: never a half-written file.

    Serialised in memory first (:func:`~medpeft_monai.checkpoint.torch_bytes`): ``torch.save`` to a file name
    records that name inside the archive, so the temporary name would make every file's bytes different; this
    way equal objects give equal files. Written by :func:`~medpeft_monai.checkpoint.write_bytes_atomic`."""
    write_bytes_atomic(path, torch_bytes(obj))


# ---------------------------------------------------------------------------------------------- merge


def _peft_modules(model: nn.Module, name: str | None) -> list[PeftModule]:
    mods = [m for m in model.modules() if isinstance(m, PeftModule) and (name is None or m.adapter_name == name)]
    if name is not None:
        _entry(model, name)
    return mods


def merge_peft(model: nn.Module, name: str | None = None) -> nn.Module:
    """Switch adapter ``name`` (default: every adapter) to its merged inference form and return ``model``.

    LoRA runs one linear layer with the folded weight ``W + (alpha / r) B A``; DKA one cropped depthwise
    kernel per adapter. The parameters themselves are not changed: the merged weights are computed from
    them (and cached until a parameter changes), so loading a checkpoint before or after merging gives
    the same network, and a merged model's ``state_dict`` equals the unmerged one's.
    """
    mods = _peft_modules(model, name)
    blocked = sorted({type(m).__name__ for m in mods if not m.mergeable})
    if blocked:
        raise PeftError(f"Cannot merge: {', '.join(blocked)} are not linear in their input.")
    for m in mods:
        m.merge()
    return model


def unmerge_peft(model: nn.Module, name: str | None = None) -> nn.Module:
    """Undo :func:`merge_peft` and return ``model``."""
    for m in _peft_modules(model, name):
        if m.mergeable:
            m.unmerge()
    return model


def param_groups(model: nn.Module, adapter_lr: float = 1e-3, head_lr: float = 1e-4,
                 weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups with separate learning rates for the adapter and the head.

    The "adapter" group holds the trainable parameters inside the model's
    :class:`~medpeft_monai.backbones.FrozenBackbone` (injected modules, or whatever the method unfroze);
    the "head" group every other trainable parameter (classifier head, decoder). Parameters an adapter
    module lists in :meth:`PeftModule.no_weight_decay` (e.g. DCRM's meta-learned inner learning rate,
    attention-bias tables and bank coefficients) go to ``*_no_decay`` groups with ``weight_decay=0``.
    Empty groups are left out. Works for any PEFT method, e.g. in a bundle config::

        "optimizer": {"_target_": "torch.optim.AdamW",
                      "params": "$medpeft_monai.peft.param_groups(@network, 1e-3, 1e-4)"}

    Args:
        model: a network containing a FrozenBackbone (or the backbone itself).
        adapter_lr: learning rate of the trainable backbone parameters (paper: 1e-3).
        head_lr: learning rate of the rest (paper: 1e-4).
        weight_decay: set on the decayed groups; ``None`` keeps the optimizer's default there.
    """
    backbone = find_backbone(model)
    in_backbone = {id(p) for p in backbone.parameters()}
    no_decay = set()
    for m in model.modules():
        if isinstance(m, PeftModule):
            no_decay |= {id(p) for n, p in m.own_parameters() if n in m.no_weight_decay()}
    groups_params: dict[str, list] = {"adapter": [], "adapter_no_decay": [], "head": [], "head_no_decay": []}
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = ("adapter" if id(p) in in_backbone else "head") + ("_no_decay" if id(p) in no_decay else "")
        groups_params[key].append(p)
    groups = []
    for key, params in groups_params.items():
        if not params:
            continue
        group = {"params": params, "lr": float(adapter_lr if key.startswith("adapter") else head_lr), "name": key}
        if key.endswith("_no_decay"):
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
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

    def base_parameters(self, backbone: FrozenBackbone) -> Iterator[nn.Parameter]:
        owned = {id(p) for m in backbone.modules() if isinstance(m, PeftModule) for _, p in m.own_parameters()}
        return (p for p in backbone.parameters() if id(p) not in owned)


@register_method
@dataclass
class BitFitConfig(PeftConfig):
    """BitFit (Ben Zaken et al. 2022): only bias terms of the selected blocks train."""

    method: ClassVar[str] = "bitfit"

    def base_parameters(self, backbone: FrozenBackbone) -> Iterator[nn.Parameter]:
        for i in select_blocks(backbone, self.blocks):
            for _, _, module, _, _ in _walk(backbone.block_module(i), internals=False):
                if isinstance(module, PeftModule):
                    continue
                bias = module._parameters.get("bias")
                if bias is not None:
                    yield bias
