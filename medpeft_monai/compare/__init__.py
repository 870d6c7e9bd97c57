"""Which method for my data? Every PEFT method on the user's own datalist, one report.

``python -m medpeft_monai.compare --datalist my.json --out compare_out`` (or ``--bundle bundles/<name>``
for a bundle's datalist, backbone and weights) trains each method at each training fraction and fold under
the same budget, scores the ``test`` section, and writes ``compare_out/report.html`` (self-contained),
``results.csv``, ``summary.csv`` and ``report.json``. A bundle reaches it through its ``compare.json``::

    python -m monai.bundle run --config_file "['B/configs/train.json','B/configs/compare.json']" --bundle_root B

:mod:`~medpeft_monai.compare.methods`: the methods and their explicit settings;
:mod:`~medpeft_monai.compare.sweep`: data, training, resume; :mod:`~medpeft_monai.compare.cache`: frozen-prefix
reuse; :mod:`~medpeft_monai.compare.report`: the report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from medpeft_monai.compare.methods import DEFAULT_METHODS, METHOD_DEFAULTS, MethodSpec, method_specs
from medpeft_monai.compare.sweep import SweepSettings, run_sweep

__all__ = ["DEFAULT_METHODS", "METHOD_DEFAULTS", "MethodSpec", "SweepSettings", "bundle_settings", "method_specs",
           "run", "run_sweep"]

#: bundle config key -> SweepSettings field, read from the bundle's configs/train.json
BUNDLE_KEYS = {"datalist": "datalist", "backbone": "backbone", "backbone_weights": "weights",
               "image_size": "image_size", "in_chans": "in_chans", "num_classes": "num_classes",
               "backbone_kwargs": "backbone_kwargs"}


def bundle_settings(bundle: str | os.PathLike, skip: Sequence[str] = ()) -> dict:
    """The datalist, backbone, weights, image size, channels, classes and backbone arguments of a bundle's
    ``configs/train.json`` (its defaults, e.g. the built-in sample data), leaving out the keys in ``skip``."""
    from monai.bundle import ConfigParser

    train = Path(bundle) / "configs" / "train.json"
    if not train.is_file():
        raise FileNotFoundError(f"{bundle} has no configs/train.json; pass a bundle folder such as "
                                "bundles/dka_segmentation, or --datalist instead of --bundle.")
    parser = ConfigParser()
    parser.read_config(str(train))
    parser["bundle_root"] = str(bundle)
    out = {}
    for key, field_name in BUNDLE_KEYS.items():
        if key in parser and key not in skip:
            value = parser.get_parsed_content(key)
            out[field_name] = str(value) if key == "backbone_weights" and value is not None else value
    return out


def run(out: str | os.PathLike = "compare_out", datalist: str | os.PathLike | None = None,
        bundle: str | os.PathLike | None = None, methods: Sequence[str] | None = None,
        settings: Sequence[str] | None = None, last_blocks: int | None = None, device: str | None = None,
        progress: bool = True, **sweep_settings) -> dict:
    """Run (or continue) a comparison and write its report into ``out``; returns the report's data.

    Args:
        out: output folder (a rerun into it continues a killed sweep).
        datalist: Decathlon-style JSON with ``training``, ``test`` and optionally ``validation``.
        bundle: a bundle folder whose ``configs/train.json`` provides defaults (datalist, backbone, ...);
            every explicit argument wins over it.
        methods: names from :data:`METHOD_DEFAULTS` (default :data:`DEFAULT_METHODS`).
        settings: per-method changes ``"METHOD.KEY=VALUE"``.
        last_blocks: adapt only the last N blocks with every method that takes ``blocks``.
        sweep_settings: fields of :class:`SweepSettings` (backbone, weights, fractions, folds, steps, ...);
            ``None`` means "not given" (the default or the bundle's value), ``weights="none"`` no weights.
    """
    values = bundle_settings(bundle, skip=["datalist"] if datalist is not None else []) if bundle is not None else {}
    values.update({k: v for k, v in sweep_settings.items() if v is not None})
    if datalist is not None:
        values["datalist"] = str(datalist)
    if "datalist" not in values:
        raise ValueError("Pass a datalist (--datalist my.json) or a bundle (--bundle bundles/<name>).")
    values["datalist"] = str(values["datalist"])
    if values.get("weights") in ("none", "None", ""):
        values["weights"] = None
    unknown = set(values) - set(SweepSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"Unknown comparison setting(s) {sorted(unknown)}; see medpeft_monai.compare.SweepSettings.")
    specs = method_specs(list(methods) if methods else None, list(settings or []), last_blocks)
    return run_sweep(SweepSettings(**values), specs, out, device=device, show_progress=progress)
