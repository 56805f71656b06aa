"""TVM's CPU thread pool in a forked child.

TVM keeps its worker pool in a thread-local object whose threads do not survive ``fork()``:
a child (a ``DataLoader`` worker, a ``multiprocessing`` fork) that runs a parallel kernel
would wait on them forever. TVM re-reads ``TVM_NUM_THREADS`` on every parallel launch and,
at 1, runs the kernel on the calling thread without the pool; so forked children run
tvmgroup's kernels on one thread (as torch does in ``DataLoader`` workers). The parent keeps
its pool.
"""

from __future__ import annotations

import os

_installed = False


def _serial_in_child() -> None:
    os.environ["TVM_NUM_THREADS"] = "1"


def install_fork_handler() -> None:
    """Registers the child-side handler once per process (a no-op where fork does not exist)."""
    global _installed
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_serial_in_child)
        _installed = True
