"""Where tvmgroup keeps its files: ``$TVMGROUP_HOME`` (default ``~/.cache/tvmgroup``)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The user's tvmgroup directory: compiled kernels and the user's tuning logs."""
    env = os.environ.get("TVMGROUP_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvmgroup"


def kernel_cache_dir() -> Path:
    return home() / "kernels"


def user_logs_dir() -> Path:
    return home() / "tuning_logs"


def shipped_logs_dir() -> Path:
    """The tuning logs that come with the package (the repo's ``tuning_logs/``)."""
    from tvmgroup import tuning_logs  # the package-data directory

    return Path(tuning_logs.__file__).parent
