"""Small helpers bundle configs call."""

from __future__ import annotations

import os

__all__ = ["require_file"]


def require_file(path: str | os.PathLike, fix: str) -> str:
    """Return ``path`` if it is an existing file, else raise ``FileNotFoundError`` naming it and ``fix``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Required file not found: {path}. Fix: {fix}.")
    return os.fspath(path)
