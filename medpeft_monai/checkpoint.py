"""Crash-safe checkpoint files: a set of files (``model.pt`` + ``adapter.pt``) committed together under a
manifest, checked against it when read, and a lock on the folder a run writes into.

:func:`commit_files` replaces a set of files in a folder in four steps:

1. every new file is written in full as ``.next-<name>`` (through :func:`~medpeft_monai.utils.atomic_path`:
   complete or absent);
2. the new manifest (run, epoch, metric, each file's size and SHA-256) is written as ``.next-<manifest>``:
   **the commit point**;
3. each ``.next-<name>`` is renamed onto ``<name>``;
4. ``.next-<manifest>`` is renamed onto ``<manifest>``.

A kill before step 2 leaves the previous files and manifest as they were (the ``.next-*`` leftovers are
removed later). A kill after it leaves a complete new set, which :func:`complete_commit` finishes by doing
steps 3-4 again; the next run does it first, and :func:`checked_file` (what the bundles' loaders call) does
it when no run holds the folder's lock. So the files a manifest names are always from one save, and a file
that does not match its manifest (cut short, replaced, or mixed with another save by hand) is refused,
naming the file and the fix. :class:`RunLock` keeps a second run out of a folder.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import io
import json
import logging
import os
import socket
import time
import zipfile
from typing import Any

import torch

from medpeft_monai.utils import atomic_path, require_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "RunLock",
    "RunLockError",
    "checked_file",
    "commit_files",
    "complete_commit",
    "read_manifest",
    "torch_bytes",
    "write_bytes_atomic",
]

CHECKPOINT_FORMAT = "medpeft_monai.checkpoint/1"
NEXT = ".next-"  # prefix of the files of a save in progress
LOCK_FILE = "train.lock"
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file does not match its manifest, or a run cannot be resumed from its state file."""


class RunLockError(RuntimeError):
    """Another live run holds the folder's lock."""


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` to bytes (serialised in memory, so equal objects give equal bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`, flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_manifest(folder: str | os.PathLike, manifest: str) -> dict | None:
    """The committed manifest ``<folder>/<manifest>``, or ``None`` if there is none."""
    path = os.path.join(folder, manifest)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return record if record.get("format") == CHECKPOINT_FORMAT else None


def _manifests(folder: str, pending: bool) -> list[tuple[str, dict]]:
    """``(path, record)`` of the folder's committed (or pending) manifests."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, (NEXT if pending else "") + "*.json"))):
        if not pending and os.path.basename(path).startswith("."):
            continue
        try:
            if os.path.getsize(path) > 1 << 20:  # a large JSON (e.g. a datalist) is no record
                continue
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):  # e.g. renamed by a live run meanwhile
            continue
        if isinstance(record, dict) and record.get("format") == CHECKPOINT_FORMAT:
            out.append((path, record))
    return out


def commit_files(folder: str | os.PathLike, files: dict[str, bytes], manifest: str, info: dict) -> dict:
    """Replace ``files`` (name -> bytes) in ``folder`` together, recorded in ``<folder>/<manifest>`` with
    ``info`` (run, epoch, metric, ...); see the module docstring. Call it while holding the folder's
    :class:`RunLock`. Returns the manifest record."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    record = {"format": CHECKPOINT_FORMAT, **info, "saved": _now(),
              "files": {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    for name, data in files.items():
        write_bytes_atomic(os.path.join(folder, NEXT + name), data)
    write_bytes_atomic(os.path.join(folder, NEXT + manifest), json.dumps(record, indent=1).encode())  # commit
    complete_commit(folder, interrupted=False)
    return record


def complete_commit(folder: str | os.PathLike, interrupted: bool = True) -> None:
    """Finish an interrupted :func:`commit_files` (steps 3-4) and remove the leftovers of one interrupted
    before its commit point. Call it while holding the folder's :class:`RunLock`."""
    folder = os.fspath(folder)
    for path, record in _manifests(folder, pending=True):
        for name, meta in record["files"].items():
            staged, final = os.path.join(folder, NEXT + name), os.path.join(folder, name)
            if os.path.exists(staged):
                os.replace(staged, final)
            if not os.path.isfile(final) or _sha256_file(final) != meta["sha256"]:
                raise CheckpointError(f"Cannot complete the save recorded in {path}: {final} is not the file it "
                                      f"names. Fix: move {folder} away and train again.")
        os.replace(path, os.path.join(folder, os.path.basename(path)[len(NEXT):]))
        if interrupted:
            logger.warning(f"completed the interrupted save of {sorted(record['files'])} in {folder} "
                           f"(epoch {record.get('epoch')} of run {record.get('run')})")
    for path in glob.glob(os.path.join(folder, NEXT + "*")) + glob.glob(os.path.join(folder, ".tmp-*")):
        if os.path.isfile(path):  # a save killed before its commit point: the earlier files are intact
            os.remove(path)


def _find_record(folder: str, name: str, pending: bool) -> tuple[str | None, dict | None]:
    for path, record in _manifests(folder, pending):
        if name in record.get("files", {}):
            return path, record
    return None, None


def checked_file(path: str | os.PathLike, fix: str = "train the bundle first or pass --ckpt_path") -> str:
    """``path`` if it is a complete checkpoint file: what the bundles' loaders call before reading one.

    A missing file is a ``FileNotFoundError`` naming ``fix``. An interrupted save in the folder is completed
    first (:func:`complete_commit`) unless a live run holds the folder's lock. A file that a manifest in its
    folder names must have the recorded SHA-256 (else :class:`CheckpointError` naming the file, the manifest
    and the fix); a file no manifest names (e.g. trained elsewhere) is only checked to be a complete archive.
    """
    path = require_file(path, fix)
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if _manifests(folder, pending=True):  # a save was interrupted, or a run is saving right now
        lock = RunLock(folder)
        try:
            free = lock.try_acquire()
        except OSError:  # e.g. a read-only folder: only check
            free = False
        if free:
            try:
                complete_commit(folder)
            finally:
                lock.release()
    for attempt in range(2):  # a second look if a live run committed a new save while this one read
        mpath, record = _find_record(folder, name, pending=False)
        _, pending = _find_record(folder, name, pending=True)  # only while a live run is saving
        if record is None and pending is None:
            with open(path, "rb") as f:
                zipped = f.read(2) == b"PK"
            if os.path.getsize(path) == 0 or (zipped and not zipfile.is_zipfile(path)):
                raise CheckpointError(f"{path} is empty or cut short (not a complete torch archive). Fix: {fix}.")
            return path
        digest = _sha256_file(path)
        if any(r is not None and r["files"][name]["sha256"] == digest for r in (record, pending)):
            return path
        if attempt == 0:
            time.sleep(0.2)
    rec = record or pending
    want, size = rec["files"][name], os.path.getsize(path)
    raise CheckpointError(
        f"{path} does not match {mpath or folder} (the record of its save, written last: epoch {rec.get('epoch')} "
        f"of run {rec.get('run')}, {want['bytes']} bytes, sha256 {want['sha256'][:12]}...): this file has {size} "
        f"bytes{' (cut short)' if size < want['bytes'] else ''} and other contents. It was damaged or replaced "
        f"after the save, or comes from another save than the rest of {folder}. Fix: put back the files of one "
        "save together, or train again into an empty folder.")


class RunLock:
    """Exclusive lock of the folder a run writes into: ``<folder>/train.lock`` (``flock``, released by the
    system when the process dies), recording the holder's PID, host and start time.

    :meth:`acquire` refuses a folder another live process holds (:class:`RunLockError` naming the folder,
    the lock file and the holder); a lock file left by a process that is gone (killed) is taken over with a
    warning. Without ``fcntl`` (Windows) there is no lock, with a warning.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_FILE) -> None:
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, name)
        self.fd: int | None = None

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def try_acquire(self) -> bool:
        """Take the lock if it is free; ``False`` if another open lock (of any process) holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            logger.warning(f"no file locking on this system: {self.folder} is not protected against a second run")
            return True
        if self.fd is not None:
            return True
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        old = self._holder(fd)
        if old.get("pid"):
            logger.warning(f"{self.path}: taking over the lock left by PID {old['pid']} on {old.get('host')} "
                           f"(since {old.get('since')}), which is no longer running: its run was interrupted")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd
        return True

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockError` naming the folder, the lock file and the holder."""
        if self.try_acquire():
            return
        with open(self.path, "rb") as f:
            holder = self._holder(f.fileno())
        raise RunLockError(
            f"{self.folder} is in use by another run (PID {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}; lock file {self.path}). Wait for it to finish, or train into "
            "another folder (--ckpt_dir).")

    def release(self) -> None:
        """Release the lock (the lock file stays, emptied)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
