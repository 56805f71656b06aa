"""Listing and clearing the on-disk kernel cache (``tvmgroup cache``).

The cache is laid out by :class:`tvmgroup.kernel.KernelCache`::

    $TVMGROUP_HOME/kernels/<TVM version>/<target key>/<spec key>-<digest>.json   (metadata, written last)
                                                      <spec key>-<digest>-main.so (-tail.so)
                                                      <spec key>-<digest>.lock

Listing reads only the metadata JSON, as data (nothing is loaded; the files are untrusted
and loading stays with :class:`~tvmgroup.kernel.KernelCache`, which checks them first). An
entry is *stale* when no process of this installation can load it: another TVM version,
or compute definitions and templates that have changed since it was built.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import tvm
from filelock import FileLock, Timeout

from tvmgroup.paths import kernel_cache_dir

PARTS = (".json", "-main.so", "-tail.so")
LOCK_TIMEOUT_S = 30.0  # an entry being written is waited for, not torn
STALE_WORKDIR_S = 3600.0  # a private temporary directory older than this was left by a killed writer


@dataclass(frozen=True)
class CacheEntry:
    stem: Path  # the entry's path without its suffixes
    tvm_version: str
    target_key: str
    spec_key: str
    variant: str  # "parallel", "serial" or "?"
    schedule: str  # the schedule's fingerprint ("default", "tuned-...") or "?"
    row_tile: int | None
    size: int  # bytes of its files
    stale: bool

    @property
    def state(self) -> str:
        return "stale" if self.stale else "ok"


def _parse_key(key: object) -> tuple[str, str, str] | None:
    """(schedule fingerprint, code fingerprint, variant) from a metadata key, or None."""
    if not isinstance(key, str):
        return None
    variant = "parallel"
    if key.endswith("|serial"):
        key, variant = key[: -len("|serial")], "serial"
    parts = key.rsplit("|", 2)
    if len(parts) != 3:
        return None
    return parts[1], parts[2], variant


def _size(stem: Path) -> int:
    total = 0
    for suffix in PARTS:
        with contextlib.suppress(OSError):
            total += os.lstat(f"{stem}{suffix}").st_size
    return total


def _printable(value: object) -> str:
    """A metadata string as it may be shown (no control characters), else ``"?"``."""
    return value if isinstance(value, str) and value.isprintable() and len(value) <= 200 else "?"


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the kernel cache (default: ``$TVMGROUP_HOME/kernels``)."""
    from tvmgroup.kernel import code_fingerprint

    root = Path(root) if root is not None else kernel_cache_dir()
    if not root.is_dir():
        return []
    current = code_fingerprint()
    entries = []
    for meta_path in sorted(root.glob("*/*/*.json")):
        if meta_path.is_symlink() or not meta_path.is_file():
            continue
        version, target = meta_path.parent.parent.name, meta_path.parent.name
        stem = meta_path.with_suffix("")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        parsed = _parse_key(meta.get("key"))
        spec = _printable(meta.get("spec"))
        row_tile = meta.get("row_tile") if isinstance(meta.get("row_tile"), int) else None
        schedule, code, variant = parsed if parsed else ("?", "?", "?")
        schedule = _printable(schedule)
        stale = version != tvm.__version__ or code != current
        entries.append(CacheEntry(stem, version, target, spec, variant, schedule, row_tile, _size(stem), stale))
    return entries


def _remove(stem: Path) -> int:
    """Deletes an entry's files under its lock (a writer finishes first); returns bytes freed."""
    freed = _size(stem)
    lock_path = f"{stem}.lock"
    with FileLock(lock_path, timeout=LOCK_TIMEOUT_S):
        for suffix in PARTS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{stem}{suffix}")
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
    return freed


def _remove_orphan(path: Path) -> int:
    """Deletes a library whose entry has no metadata (its writer was killed); returns bytes freed."""
    stem = str(path)[: -len("-main.so")]
    with FileLock(f"{stem}.lock", timeout=LOCK_TIMEOUT_S):
        if os.path.lexists(f"{stem}.json"):
            return 0
        size = path.lstat().st_size
        path.unlink()
    with contextlib.suppress(OSError):
        os.unlink(f"{stem}.lock")
    return size


def _remove_lone_lock(path: Path) -> None:
    """Deletes the lock file of an entry that is gone (unless someone holds it now)."""
    stem = str(path)[: -len(".lock")]
    with FileLock(str(path), timeout=0):
        if not any(os.path.lexists(f"{stem}{suffix}") for suffix in PARTS):
            path.unlink()


def clear(root: Path | None = None, *, stale_only: bool = False) -> tuple[int, int]:
    """Deletes cache entries (all, or only stale ones); returns (entries removed, bytes freed).

    With everything cleared, files no entry owns go too: libraries whose metadata was never
    written (a killed writer) and temporary directories older than an hour.
    """
    root = Path(root) if root is not None else kernel_cache_dir()
    removed = freed = 0
    busy = []
    for entry in list_entries(root):
        if stale_only and not entry.stale:
            continue
        try:
            freed += _remove(entry.stem)
            removed += 1
        except Timeout:
            busy.append(entry.stem)
    if not stale_only and root.is_dir():
        now = time.time()
        for path in root.glob("*/*/*"):
            with contextlib.suppress(OSError):
                if path.name.startswith(".tmp-") and path.is_dir() and not path.is_symlink():
                    if now - path.stat().st_mtime > STALE_WORKDIR_S:
                        shutil.rmtree(path, ignore_errors=True)
                elif path.name.endswith(("-main.so", "-tail.so")) and not path.is_symlink():
                    freed += _remove_orphan(path)
                elif path.suffix == ".lock" and not path.is_symlink():
                    _remove_lone_lock(path)
        for directory in sorted(root.glob("*/*"), reverse=True) + sorted(root.glob("*"), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty
    if busy:
        raise RuntimeError(
            f"removed {removed} entries; {len(busy)} stayed locked for {LOCK_TIMEOUT_S:.0f} s by a process "
            f"writing them (e.g. {busy[0]}); run again when it is done"
        )
    return removed, freed
