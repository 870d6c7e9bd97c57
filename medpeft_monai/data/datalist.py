"""Reading and writing MONAI Decathlon-style datalists with clear error messages.

A datalist is a JSON file such as::

    {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [...], "test": [...]}

Relative paths are resolved against the datalist's folder (or ``base_dir``). ``label`` may be a
path (segmentation) or a number (classification). Extra top-level keys (for example
``"classes"``) and extra entry fields (for example ``"domain"``) are allowed. A file without a
``"validation"`` section gets one carved from ``"training"`` (see :func:`validation_split`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist, partition_dataset

from medpeft_monai.utils import write_text_atomic

__all__ = [
    "VALIDATION_FRACTION",
    "VALIDATION_SEED",
    "DatalistError",
    "datalist_domains",
    "load_datalist",
    "training_subset",
    "validation_split",
    "write_datalist",
]

logger = logging.getLogger(__name__)

_PATH_KEYS = ("image", "label")

#: share and seed of the validation items carved from ``training`` when a datalist has no ``validation``
VALIDATION_FRACTION = 0.2
VALIDATION_SEED = 0
_warned: set[tuple[str, int]] = set()  # (datalist, training size) already warned about in this process


class DatalistError(ValueError):
    """A datalist file is missing, malformed or points at files that do not exist."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        hint = "a folder was given; pass the JSON file inside it" if path.is_dir() else "check the path"
        raise DatalistError(
            f"Datalist file not found: '{path}'. Fix: {hint}, or build a sample data set with "
            "medpeft_monai.data.sample_dataset(name) and use its 'datalist.json'."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatalistError(
            f"Datalist '{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix: correct the JSON syntax there (common causes: a trailing comma, single quotes, "
            "a missing bracket)."
        ) from e
    except UnicodeDecodeError as e:
        raise DatalistError(f"Datalist '{path}' is not UTF-8 text ({e}). Fix: save it as UTF-8 JSON.") from e


def _paths_of(value: Any) -> list[str]:
    """File paths held by an entry field: a string or a list of strings; numbers are not paths."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)):
        return [os.fspath(v) for v in value if isinstance(v, (str, os.PathLike))]
    return []


def load_datalist(
    datalist: str | os.PathLike,
    key: str = "training",
    base_dir: str | os.PathLike | None = None,
    check_files: bool = True,
) -> list[dict]:
    """Load section ``key`` of a Decathlon-style datalist as a list of dicts with absolute paths.

    A file with ``training`` but no ``validation`` section: ``key="validation"`` returns the items
    :func:`validation_split` carves from ``training`` (``VALIDATION_FRACTION``, ``VALIDATION_SEED``) and
    ``key="training"`` the rest, so the two calls never overlap; a warning says so. With fewer than 2
    training items ``key="training"`` returns them all and ``key="validation"`` is an error.

    Args:
        datalist: path to the JSON file.
        key: section to read, e.g. ``"training"``, ``"validation"``, ``"test"``.
        base_dir: folder that relative paths are resolved against (default: the datalist's folder).
        check_files: raise if an ``image`` or path-valued ``label`` does not exist.

    Raises:
        DatalistError: with the file name and a suggested fix for every problem found.
    """
    path = Path(datalist).expanduser()
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatalistError(
            f"Datalist '{path}' must hold a JSON object with sections such as "
            f'{{"training": [...]}}, found a {type(data).__name__}. Fix: wrap the entries in a section.'
        )
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    training = data.get("training")
    if key in ("training", "validation") and "validation" not in data and isinstance(training, list):
        if len(training) < 2 and key == "validation":
            raise DatalistError(
                f"Datalist '{path}' has no section 'validation', and its {len(training)} training item(s) are too "
                f"few to carve one from. Available sections: {_sections(data)}. Fix: add a 'validation' list "
                "to the file, or list at least 2 training items."
            )
        if len(training) < 2:
            return _load_section(path, data, key, base, check_files)
        items = _load_section(path, data, "training", base, check_files)
        rest, validation = validation_split(items, VALIDATION_FRACTION, VALIDATION_SEED)
        if (str(path.absolute()), len(items)) not in _warned:
            _warned.add((str(path.absolute()), len(items)))
            logger.warning(
                f"datalist {path} has no 'validation' section: using {len(validation)} of the {len(items)} "
                f"training items (seed {VALIDATION_SEED}, {VALIDATION_FRACTION:.0%}) for validation; add a "
                "'validation' list to choose them yourself"
            )
        return validation if key == "validation" else rest
    return _load_section(path, data, key, base, check_files)


def _sections(data: dict) -> list[str]:
    return [k for k, v in data.items() if isinstance(v, list) and all(isinstance(i, dict) for i in v)]


def _load_section(path: Path, data: dict, key: str, base: Path, check_files: bool) -> list[dict]:
    """Section ``key`` of the parsed datalist ``data`` (read from ``path``), checked, with absolute paths."""
    sections = _sections(data)
    if key not in data:
        raise DatalistError(
            f"Datalist '{path}' has no section '{key}'. Available sections: {sections}. "
            f"Fix: pass one of these as the key, or add a '{key}' list to the file."
        )
    items = data[key]
    if not isinstance(items, list):
        raise DatalistError(
            f"Section '{key}' of datalist '{path}' must be a list of entries, found a "
            f"{type(items).__name__}. Fix: use one of the list sections {sections}."
        )
    # MONAI accepts a 'test' section made of bare image paths; everything else must be dicts.
    bare_test = key == "test" and len(items) > 0 and all(isinstance(i, str) for i in items)
    if not bare_test:
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise DatalistError(
                    f"Entry {i} of section '{key}' in datalist '{path}' is a {type(item).__name__}, "
                    f'not an object. Fix: write it as {{"image": "<path>", "label": ...}}.'
                )
            if "image" not in item:
                raise DatalistError(
                    f"Entry {i} of section '{key}' in datalist '{path}' has no 'image' field "
                    f'(fields: {sorted(item)}). Fix: add "image": "<path to the image>".'
                )
    if not items:
        return []
    result = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base)
    if check_files:
        for i, item in enumerate(result):
            for field in _PATH_KEYS:
                for p in _paths_of(item.get(field)):
                    if not os.path.exists(p):
                        raise DatalistError(
                            f"Entry {i} of section '{key}' in datalist '{path}': {field} file not found: "
                            f"'{p}'. Fix: check that the file exists and that relative paths are "
                            f"relative to '{base}' (or pass base_dir=...)."
                        )
    return result


def validation_split(
    items: Sequence[dict], fraction: float = VALIDATION_FRACTION, seed: int = VALIDATION_SEED
) -> tuple[list[dict], list[dict]]:
    """Split training ``items`` into ``(training_rest, validation)``, deterministically for a given ``seed``.

    Rule: ``max(1, round(fraction * n))`` of the ``n`` items, at most ``n - 1``, chosen by a seeded
    permutation (``numpy.random.RandomState(seed)``); both parts keep the datalist order.

    Raises:
        DatalistError: fewer than 2 items, or ``fraction`` outside ``(0, 1)``, each with the fix.
    """
    items = list(items)
    n = len(items)
    if n < 2:
        raise DatalistError(f"{n} training item(s) cannot be split into training and validation. Fix: list at "
                            "least 2 training items, or give the validation items in a 'validation' list.")
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise DatalistError(f"The validation fraction must be in (0, 1), got {fraction}. Fix: e.g. 0.2.")
    n_val = min(max(1, round(fraction * n)), n - 1)
    chosen = set(np.random.RandomState(seed).permutation(n)[:n_val].tolist())
    rest = [item for i, item in enumerate(items) if i not in chosen]
    return rest, [item for i, item in enumerate(items) if i in chosen]


def _relative(value: Any, folder: str) -> Any:
    """Rewrite absolute paths (or lists of them) as paths relative to ``folder``; leave others alone."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return Path(os.path.relpath(value, folder)).as_posix() if os.path.isabs(value) else value
    if isinstance(value, (list, tuple)):
        return [_relative(v, folder) for v in value]
    return value


def write_datalist(path: str | os.PathLike, sections: Mapping[str, Any]) -> str:
    """Write a datalist JSON atomically; absolute file paths are stored relative to its folder.

    ``sections`` maps section names to lists of entry dicts. Other top-level values (for example
    ``"classes": [...]``) are written unchanged. Returns the path written.
    """
    path = Path(path).expanduser().absolute()
    folder = str(path.parent)
    out: dict[str, Any] = {}
    for name, value in sections.items():
        if (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and all(isinstance(v, Mapping) for v in value)
        ):
            out[name] = [
                {k: (_relative(v, folder) if k in _PATH_KEYS or _is_abs_path(v) else v) for k, v in e.items()}
                for e in value
            ]
        else:
            out[name] = value
    return write_text_atomic(path, json.dumps(out, indent=2) + "\n")


def _is_abs_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and os.path.isabs(os.fspath(value))


def datalist_domains(datalist: str | os.PathLike) -> list[str]:
    """The top-level ``"domains"`` list of a datalist JSON (index = ``domain_id``)."""
    with open(datalist, encoding="utf-8") as f:
        data = json.load(f)
    domains = data.get("domains") if isinstance(data, dict) else None
    if not isinstance(domains, list) or not domains:
        raise ValueError(f"Datalist {datalist} has no top-level 'domains' list; add one (names indexed by the "
                         "entries' domain_id) or set num_domains / domain names in the config.")
    return [str(d) for d in domains]


def training_subset(items: Sequence[dict], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """The seeded random share ``fraction`` of the training ``items`` (the bundles' ``data_fraction``).

    ``fraction >= 1``: every item, in datalist order; below: MONAI's
    ``partition_dataset(items, ratios=[fraction, 1 - fraction], shuffle=True, seed=seed)[0]``.

    Raises:
        DatalistError: an empty training list, ``fraction`` outside ``(0, 1]``, or a fraction so small
            that no item is selected, each with the fix.
    """
    items = list(items)
    if not items:
        raise DatalistError("The training section of the datalist is empty. Fix: list at least one "
                            '{"image": ..., "label": ...} entry under "training".')
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise DatalistError(f"data_fraction must be in (0, 1], got {fraction}. Fix: e.g. --data_fraction 0.25 "
                            "for a quarter of the training list, 1.0 for all of it.")
    if fraction >= 1.0:
        return items
    subset = partition_dataset(items, ratios=[fraction, 1.0 - fraction], shuffle=True, seed=seed)[0]
    if not subset:
        raise DatalistError(f"data_fraction={fraction} selects no item of the {len(items)} training items. Fix: "
                            f"use at least {1.0 / len(items):.3g}.")
    return list(subset)
