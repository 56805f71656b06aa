"""TVM's CPU thread pool: its size, and forked children.

Size: TVM sizes its pool at half the cores it sees on x86 (it assumes two hardware threads
per core), so on a machine or VM without them the layer used half the cores torch uses.
Unless ``TVM_NUM_THREADS`` is set, it is set to ``torch.get_num_threads()`` before the pool
starts (the first parallel kernel): both libraries use the same cores.

Where kernels run on torch's OpenMP threads instead (:mod:`tvmgroup.parallel`, the usual
case), this pool is not started; ``TVM_NUM_THREADS`` set by the user still caps the team.

Forked children:
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
# TVM_NUM_THREADS as the user set it before tvmgroup set it (None: not set, or not a count).
_USER_NUM_THREADS = os.environ.get("TVM_NUM_THREADS")


def user_num_threads() -> int | None:
    """The thread count the user asked TVM for with ``TVM_NUM_THREADS``, if any."""
    value = _USER_NUM_THREADS
    return int(value) if value is not None and value.strip().isdigit() and int(value) > 0 else None


def _serial_in_child() -> None:
    os.environ["TVM_NUM_THREADS"] = "1"


def match_torch_threads() -> None:
    """Sizes TVM's pool like torch's intra-op pool, unless ``TVM_NUM_THREADS`` says otherwise."""
    import torch

    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))


def install_fork_handler() -> None:
    """Registers the child-side handler once per process (a no-op where fork does not exist)."""
    global _installed
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_serial_in_child)
        _installed = True
