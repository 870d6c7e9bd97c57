"""The methods a comparison runs, each with explicit settings (PEFT config, width, learning rates).

Every default is written here once and recorded with each result; ``--set METHOD.KEY=VALUE`` changes
one method only (``lora.rank=4``, ``dka.hidden=48``, ``dka.adapter_lr=0.001``), ``--last-blocks N``
restricts every method that takes ``blocks`` to the last ``N`` blocks (then the blocks before them are a
frozen prefix that the sweep computes once per image, see :mod:`medpeft_monai.compare.cache`).

A name ``METHOD@LABEL`` is a variant of ``METHOD`` with its own settings, e.g. a learning-rate scan::

    --methods dka dka@slow --set dka@slow.adapter_lr=0.001 dka@slow.head_lr=0.0001
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

__all__ = ["DEFAULT_METHODS", "METHOD_DEFAULTS", "MethodSpec", "method_specs", "parse_setting"]

#: name -> PEFT config and learning rates (adapter: trainable backbone parameters, head: decoder/classifier)
METHOD_DEFAULTS: dict[str, dict] = {
    "linear_probe": {"peft": {"method": "linear_probe"}, "adapter_lr": 1e-3, "head_lr": 1e-3},
    "lora": {"peft": {"method": "lora", "rank": 8}, "adapter_lr": 1e-3, "head_lr": 1e-3},
    "adapter": {"peft": {"method": "adapter", "hidden": 16}, "adapter_lr": 1e-3, "head_lr": 1e-3},
    # the DKA paper's asynchronous rates: the adapter learns faster than the head
    "dka": {"peft": {"method": "dka", "hidden": 16}, "adapter_lr": 3e-3, "head_lr": 3e-4},
    "bitfit": {"peft": {"method": "bitfit"}, "adapter_lr": 1e-3, "head_lr": 1e-3},
    "adaptformer": {"peft": {"method": "adaptformer", "hidden": 16}, "adapter_lr": 1e-3, "head_lr": 1e-3},
    "convpass": {"peft": {"method": "convpass", "hidden": 8}, "adapter_lr": 1e-3, "head_lr": 1e-3},
    "vpt": {"peft": {"method": "vpt", "num_prompts": 10, "deep": True}, "adapter_lr": 1e-3, "head_lr": 1e-3},
    "full": {"peft": {"method": "full"}, "adapter_lr": 1e-4, "head_lr": 1e-3},
}
#: run when no ``--methods`` are given (those that do not apply to the backbone are skipped, with the reason)
DEFAULT_METHODS = ["linear_probe", "lora", "adapter", "dka", "bitfit", "adaptformer", "convpass", "vpt"]
#: methods without a ``blocks`` setting (``--last-blocks`` leaves them alone)
NO_BLOCKS = {"linear_probe", "full"}


@dataclass(frozen=True)
class MethodSpec:
    """One method of the sweep: its name, PEFT config and learning rates."""

    name: str
    peft: dict
    adapter_lr: float
    head_lr: float

    def to_dict(self) -> dict:
        return {"name": self.name, "peft": self.peft, "adapter_lr": self.adapter_lr, "head_lr": self.head_lr}


def parse_setting(text: str) -> tuple[str, str, object]:
    """``"METHOD.KEY=VALUE"`` -> ``(method, key, value)``; the value is read as JSON when it parses
    (``4``, ``0.001``, ``[-2, -1]``, ``true``), else kept as a string."""
    head, sep, raw = text.partition("=")
    method, dot, key = head.rpartition(".")
    if not sep or not dot or not method or not key:
        raise ValueError(f"A setting reads METHOD.KEY=VALUE (e.g. dka.hidden=48 or lora.adapter_lr=0.001), "
                         f"got {text!r}.")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, key, value


def method_specs(names: list[str] | None = None, settings: list[str] | None = None,
                 last_blocks: int | None = None) -> list[MethodSpec]:
    """The specs of ``names`` (default :data:`DEFAULT_METHODS`) with ``settings`` and ``last_blocks`` applied.

    Raises:
        ValueError: an unknown method, a setting for a method not in the sweep, or a bad ``last_blocks``.
    """
    names = list(names or DEFAULT_METHODS)
    unknown = [n for n in names if n.split("@")[0] not in METHOD_DEFAULTS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {sorted(METHOD_DEFAULTS)} (or METHOD@LABEL "
                         "for a variant).")
    if len(set(names)) != len(names):
        raise ValueError(f"A method is listed twice in {names}; name variants METHOD@LABEL.")
    if last_blocks is not None and last_blocks < 1:
        raise ValueError(f"--last-blocks must be >= 1, got {last_blocks}.")
    table = {n: copy.deepcopy(METHOD_DEFAULTS[n.split("@")[0]]) for n in names}
    for n, spec in table.items():
        if last_blocks is not None and n.split("@")[0] not in NO_BLOCKS:
            spec["peft"]["blocks"] = list(range(-last_blocks, 0))
    for text in settings or []:
        method, key, value = parse_setting(text)
        if method not in table:
            raise ValueError(f"Setting {text!r} names method {method!r}, which is not in this sweep ({names}).")
        if key in ("adapter_lr", "head_lr"):
            table[method][key] = float(value)
        elif key == "method":
            raise ValueError(f"Setting {text!r}: the method of {method!r} is fixed; add another method instead.")
        else:
            table[method]["peft"][key] = value
    return [MethodSpec(n, s["peft"], float(s["adapter_lr"]), float(s["head_lr"])) for n, s in table.items()]
