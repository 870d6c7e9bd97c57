"""Small helpers bundle configs call, the one place where files are written atomically, and the
layout of a bundle's variants (:class:`BundleVariant`).

Every file this package writes (checkpoints, adapters, datalists, prediction CSVs, segmentation masks,
figures, benchmark results) goes through :func:`atomic_path`: it is written under a temporary name in the
destination folder and renamed onto its final name only when complete, so a crash or a full disk never
leaves a half-written file, and an older file of the same name survives a failed write.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from monai.data import NibabelWriter, PILWriter

__all__ = [
    "AtomicNibabelWriter",
    "AtomicPILWriter",
    "BundleVariant",
    "atomic_path",
    "bundle_folders",
    "bundle_variants",
    "common_root",
    "install_root_cause_hook",
    "label_names",
    "require_file",
    "write_csv_atomic",
    "write_text_atomic",
]


def common_root(items: Sequence[Mapping], key: str = "image") -> str:
    """The deepest folder holding every ``item[key]`` file: the ``data_root_dir`` under which inference
    outputs keep their inputs' relative folders (``SaveImaged(data_root_dir=...)``), so that two images with
    the same name in different folders get two masks, while images of one folder are written side by side."""
    folders = [os.path.dirname(os.path.abspath(os.fspath(i[key]))) for i in items if key in i]
    return os.path.commonpath(folders) if folders else ""


def label_names(metadata: str | os.PathLike, include_background: bool = False) -> list[str]:
    """Class names of a bundle's segmentation output, in label order, from its metadata's ``channel_def``
    (without label 0, the background, unless ``include_background``): the per-class report columns."""
    meta = json.loads(Path(metadata).read_text())
    outputs = meta.get("network_data_format", {}).get("outputs", {})
    channels = next(iter(outputs.values()), {}).get("channel_def", {})
    names = [str(channels[k]) for k in sorted(channels, key=int)]
    return names if include_background else names[1:]


def root_cause(err: BaseException) -> BaseException:
    """The first exception of ``err``'s chain (following ``__cause__``, else ``__context__``)."""
    seen = {id(err)}
    while (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        err = nxt
    return err


def install_root_cause_hook() -> None:
    """Make ``sys.excepthook`` end an uncaught error's report with its root cause (once per process).

    The previous hook prints the whole traceback as before; when the error was raised from another one (MONAI's
    bundle runner wraps every failure in "Failed to evaluate ConfigExpression"), the root cause's type and
    message follow as the last lines, so the reason and its fix are what a user reads first at the bottom.
    """
    import sys

    previous = sys.excepthook
    if getattr(previous, "medpeft_root_cause", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        root = root_cause(exc) if exc is not None else None
        if root is not None and root is not exc:
            print(f"\nmedpeft_monai: the error above was caused by\n{type(root).__name__}: {root}", file=sys.stderr)

    hook.medpeft_root_cause = True
    sys.excepthook = hook


def require_file(path: str | os.PathLike, fix: str) -> str:
    """Return ``path`` if it is an existing file, else raise ``FileNotFoundError`` naming it and ``fix``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Required file not found: {path}. Fix: {fix}.")
    return os.fspath(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name ends with the final file name, so writers that choose a format from the extension
    (``nib.save``, ``fig.savefig``) behave as for ``path``. On an exception the temporary file is removed
    and ``path`` is left as it was. Missing parent folders are created.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return os.fspath(path)


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Write a CSV (``header`` then ``rows``) to ``path`` atomically; returns the path."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


class _AtomicWrite:
    """Mixin for a MONAI ``ImageWriter``: ``write`` goes through :func:`atomic_path`."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=verbose, **kwargs)


class AtomicNibabelWriter(_AtomicWrite, NibabelWriter):
    """MONAI's ``NibabelWriter`` (NIfTI), written atomically. In a bundle:
    ``{"_target_": "SaveImaged", ..., "writer": "medpeft_monai.utils.AtomicNibabelWriter"}``."""


class AtomicPILWriter(_AtomicWrite, PILWriter):
    """MONAI's ``PILWriter`` (PNG, JPEG, ...), written atomically; the format follows the file extension."""


@dataclass(frozen=True)
class BundleVariant:
    """One model a bundle trains and serves: ``suffix`` ``""`` for the main one, e.g. ``"_seg"`` for a variant.

    A variant's files share its suffix: ``configs/train<suffix>.json``, ``configs/inference<suffix>.json``,
    ``configs/multi_gpu_train<suffix>.json``, ``configs/metadata<suffix>.json`` (else ``metadata.json``),
    ``models/model<suffix>.pt`` and ``models/adapter<suffix>.pt``; its name is ``<bundle folder><suffix>``.
    """

    bundle: Path
    suffix: str = ""

    @property
    def name(self) -> str:
        return self.bundle.name + self.suffix

    def config(self, kind: str) -> Path:
        """``configs/<kind><suffix>.json``, e.g. ``config("inference")``."""
        return self.bundle / "configs" / f"{kind}{self.suffix}.json"

    @property
    def metadata(self) -> Path:
        own = self.config("metadata")
        return own if own.is_file() else self.bundle / "configs" / "metadata.json"

    @property
    def model_file(self) -> Path:
        return self.bundle / "models" / f"model{self.suffix}.pt"

    @property
    def adapter_file(self) -> Path:
        return self.bundle / "models" / f"adapter{self.suffix}.pt"

    def output_format(self) -> str | None:
        """``format`` of the first output in the variant's metadata (``"segmentation"``, ``"classes"``, ...)."""
        meta = json.loads(self.metadata.read_text())
        outputs = meta.get("network_data_format", {}).get("outputs", {})
        return next(iter(outputs.values()), {}).get("format")


def bundle_folders(root: str | os.PathLike) -> list[Path]:
    """The bundles under ``root``: its sub-folders that hold ``configs/metadata.json``, sorted by name."""
    return sorted(p for p in Path(root).iterdir() if (p / "configs" / "metadata.json").is_file())


def bundle_variants(bundle: str | os.PathLike) -> list[BundleVariant]:
    """The variants of a bundle folder, one per ``configs/inference<suffix>.json``, main variant first."""
    bundle = Path(bundle)
    configs = sorted((bundle / "configs").glob("inference*.json"), key=lambda p: (len(p.name), p.name))
    return [BundleVariant(bundle, p.stem[len("inference"):]) for p in configs]
