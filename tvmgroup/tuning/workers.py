"""What MetaSchedule's worker processes run first: end with the tuning process.

LocalBuilder, LocalRunner and RPCRunner measure in ``tvm.exec.popen_worker`` processes. A
worker notices its parent is gone only when it next reads from it, so one busy with a build
or a measurement outlived a killed ``tvmgroup tune`` by up to its timeout. On Linux each
worker asks the kernel for SIGKILL when the thread that started it dies (``prctl``
``PR_SET_PDEATHSIG``); MetaSchedule's pools start workers from threads that live as long as
the pool, so this ends them with the tuning process and never earlier.

The initializer is pickled by value (``cloudpickle.register_pickle_by_value``): a worker
runs it without importing tvmgroup (and torch), which would slow every worker start.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import cloudpickle

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def worker_initializer() -> Callable[[], None]:
    """The ``initializer`` for MetaSchedule's builders and runners started by this process."""
    return functools.partial(_die_with_parent, os.getpid())


cloudpickle.register_pickle_by_value(sys.modules[__name__])
