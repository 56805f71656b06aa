"""The files of the on-disk kernel cache: written privately, checked before anything loads.

A cached kernel is a shared library: loading one runs its code. So an entry is loaded only
when every directory from the cache root down is owned by this user and writable by no one
else, the files are plain files (not links) owned by this user, and each library's SHA-256
matches the one recorded beside it when it was written. Files are written into a fresh
private temporary directory (never a predictable name, never through a link) and moved into
place atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator


class UntrustedCache(OSError):
    """A cache directory or file that this process must not load code from."""


def _check_owned(path: Path, what: str, *, follow: bool = False) -> os.stat_result:
    info = os.stat(path) if follow else os.lstat(path)
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UntrustedCache(f"{what} {path} is owned by uid {info.st_uid}, not by this user ({os.getuid()})")
    return info


def check_private_dirs(root: Path, leaf: Path) -> None:
    """Raises :class:`UntrustedCache` unless every directory from ``root`` to ``leaf`` is a
    real directory owned by this user and not writable by group or others."""
    root, directory = Path(root), Path(leaf)
    while True:
        info = _check_owned(directory, "cache directory")
        if not stat.S_ISDIR(info.st_mode):
            raise UntrustedCache(f"cache directory {directory} is not a directory (a link?)")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedCache(f"cache directory {directory} is writable by others (mode {oct(info.st_mode & 0o777)})")
        if directory == root or directory.parent == directory:
            return
        directory = directory.parent


def make_private_dirs(root: Path, leaf: Path) -> None:
    """Creates ``leaf`` (mode 0700 for what it creates) and checks the chain from ``root``."""
    Path(leaf).mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dirs(root, leaf)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def owned_file(path: Path) -> Path:
    """``path`` if it is a plain file (not a link) owned by this user."""
    info = _check_owned(path, "cached file")
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedCache(f"cached file {path} is not a plain file (a link?)")
    return path


def checked_file(path: Path, sha256: str) -> Path:
    """``path`` if it is a plain file owned by this user whose SHA-256 is ``sha256``."""
    owned_file(path)
    got = sha256_of(path)
    if got != sha256:
        raise UntrustedCache(f"cached file {path} has SHA-256 {got[:16]}..., recorded {sha256[:16]}...")
    return path


@contextlib.contextmanager
def private_workdir(directory: Path) -> Iterator[Path]:
    """A fresh directory only this user can enter, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish(work: Path, name: str, destination: Path, write: Callable[[Path], None]) -> str:
    """Writes ``work/name`` with ``write``, moves it to ``destination``; returns its SHA-256."""
    staged = work / name
    write(staged)
    sha256 = sha256_of(staged)
    os.replace(staged, destination)
    return sha256


def write_json(work: Path, destination: Path, value: dict) -> None:
    publish(work, destination.name, destination, lambda p: p.write_text(json.dumps(value, sort_keys=True)))


def remove_entry(stem: Path, names: list[str]) -> None:
    """Deletes an entry's files (a stale or tampered entry, before it is rebuilt)."""
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(f"{stem}{name}")
