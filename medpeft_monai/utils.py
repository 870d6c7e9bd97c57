"""Small helpers bundle configs call, and the one place where files are written atomically.

Every file this package writes (checkpoints, adapters, datalists, prediction CSVs, segmentation masks,
figures, benchmark results) goes through :func:`atomic_path`: it is written under a temporary name in the
destination folder and renamed onto its final name only when complete, so a crash or a full disk never
leaves a half-written file, and an older file of the same name survives a failed write.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from monai.data import NibabelWriter, PILWriter

__all__ = [
    "AtomicNibabelWriter",
    "AtomicPILWriter",
    "atomic_path",
    "require_file",
    "write_csv_atomic",
    "write_text_atomic",
]


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
