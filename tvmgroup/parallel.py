"""One thread pool: tvmgroup's CPU kernels run their parallel loops on torch's OpenMP threads.

TVM runs a kernel's parallel loop on a thread pool of its own, and torch runs its ops on
OpenMP (libgomp) threads. After a parallel region both spin-wait for more work, so in a
model, where the layer runs between torch ops, each pool's spinning threads take the cores
the other pool's next region needs: on 2 cores a grouped layer between a ReLU and a
LayerNorm ran up to 2.3x slower than alone. Handing TVM's parallel launches to the OpenMP
runtime torch already uses gives one pool: its threads, still spinning from torch's last
op, pick up the kernel at once, and are ready again for torch's next op.

How: a compiled TVM library calls the runtime's parallel launch through a function pointer
it exports (``__TVMBackendParallelLaunch``; the runtime fills it in at load time). A tiny C
launcher built with ``-fopenmp`` against torch's libgomp runs the kernel's tasks in an
OpenMP parallel region, and :func:`use_shared_pool` points a loaded library at it. That
needs the library loaded from a file (kernels from the disk cache; kernels compiled in
memory keep TVM's pool), a C compiler, and torch on GNU OpenMP; anything else keeps TVM's
pool, with one warning (``TVMGROUP_SHARED_POOL=0`` keeps it without one).

The launcher is compiled from the source below into a private temporary directory once
per process: nothing from a cache or a log is loaded for it.

Threads: the team has ``omp_get_max_threads()`` threads (what ``torch.set_num_threads``
set on the calling thread), at most ``TVM_NUM_THREADS`` when the user set it; a forked
child (a ``DataLoader`` worker) runs kernels on its calling thread only, since libgomp's
pool does not survive ``fork()``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

from tvmgroup.threads import user_num_threads

log = logging.getLogger(__name__)

LAUNCHER_SOURCE = r"""
#include <stdint.h>
#include <omp.h>
#ifdef __cplusplus
extern "C" {
#endif
/* The ABI of TVM's parallel launch (tvm/runtime/c_backend_api.h). */
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static volatile int max_threads = 0; /* 0: no cap beyond omp_get_max_threads() */

void tvmgroup_set_max_threads(int n) { max_threads = n; }

int tvmgroup_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int threads = omp_get_max_threads();
  if (max_threads > 0 && threads > max_threads) threads = max_threads;
  if (num_task > 0 && threads > num_task) threads = num_task;
  if (threads <= 1 || omp_in_parallel()) {
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata) == 0 ? 0 : -1;
  }
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    /* The team may be smaller than asked for: the tasks split the work by its real size. */
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    if (flambda(omp_get_thread_num(), &env, cdata) != 0) {
#pragma omp atomic write
      failed = 1;
    }
  }
  return failed ? -1 : 0;
}

int tvmgroup_parallel_barrier(int task_id, TVMParallelGroupEnv* penv) {
  (void)task_id;
  (void)penv;
#pragma omp barrier
  return 0;
}
#ifdef __cplusplus
}
#endif
"""

# The pointers a TVM library calls the runtime through, and what the launcher replaces them with.
_POINTERS = {"__TVMBackendParallelLaunch": "tvmgroup_parallel_launch",
             "__TVMBackendParallelBarrier": "tvmgroup_parallel_barrier"}

_lock = threading.Lock()
_launcher: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the shared pool is not used, once known


def _openmp_libraries() -> set[str]:
    """The OpenMP runtimes mapped into this process (from /proc/self/maps)."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if line.count("/") else ""
            name = os.path.basename(path)
            if name.startswith(("libgomp", "libomp", "libiomp")):
                found.add(os.path.realpath(path))
    return found


def _build_launcher() -> ctypes.CDLL:
    import torch
    from tvm.support import cc

    if not os.path.exists("/proc/self/maps"):
        raise RuntimeError("only on Linux")
    if "OpenMP" not in torch.__config__.parallel_info():
        raise RuntimeError("torch does not run on OpenMP here")
    before = _openmp_libraries()
    if not any("gomp" in os.path.basename(p) for p in before):
        raise RuntimeError("torch's OpenMP runtime is not GNU libgomp")
    work = Path(tempfile.mkdtemp(prefix="tvmgroup-launcher-"))  # mode 0700, this user's
    try:
        source = work / "launcher.c"
        source.write_text(LAUNCHER_SOURCE)
        library = work / "launcher.so"
        cc.create_shared(str(library), [str(source)], options=["-O2", "-fopenmp"])
        launcher = ctypes.CDLL(str(library))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the mapping stays valid
    after = _openmp_libraries()
    if after != before:
        raise RuntimeError(f"the launcher brought another OpenMP runtime ({', '.join(sorted(after - before))})")
    if user_num_threads() is not None:
        launcher.tvmgroup_set_max_threads(user_num_threads())
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: launcher.tvmgroup_set_max_threads(1))
    return launcher


def launcher() -> ctypes.CDLL | None:
    """The OpenMP launcher, built on first use; None (with one warning) where it cannot be."""
    global _launcher, _unavailable
    with _lock:
        if _launcher is not None or _unavailable is not None:
            return _launcher
        if os.environ.get("TVMGROUP_SHARED_POOL", "1") == "0":
            _unavailable = "TVMGROUP_SHARED_POOL=0"
            return None
        try:
            _launcher = _build_launcher()
        except Exception as err:  # no compiler, no GNU OpenMP, not Linux: TVM's own pool serves
            _unavailable = f"{type(err).__name__}: {err}".splitlines()[0]
            warnings.warn(
                f"tvmgroup: kernels keep TVM's own thread pool, which can slow them down between "
                f"torch ops ({_unavailable}); TVMGROUP_SHARED_POOL=0 silences this",
                stacklevel=3,
            )
        return _launcher


def use_shared_pool(library_path: str | os.PathLike) -> bool:
    """Points the parallel launches of the TVM library loaded from ``library_path`` at torch's
    OpenMP threads. Returns whether it did (False: the library keeps TVM's pool)."""
    shim = launcher()
    if shim is None:
        return False
    try:
        library = ctypes.CDLL(os.fspath(library_path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        log.debug("tvmgroup: %s is not loaded; it keeps TVM's pool", library_path)
        return False
    patched = False
    for pointer, function in _POINTERS.items():
        try:
            slot = ctypes.c_void_p.in_dll(library, pointer)
        except ValueError:  # a library without parallel loops (serial builds) has none
            continue
        slot.value = ctypes.cast(getattr(shim, function), ctypes.c_void_p).value
        patched = True
    return patched


def is_shared(library_path: str | os.PathLike) -> bool:
    """Whether the loaded library at ``library_path`` launches on the OpenMP launcher."""
    shim = _launcher
    if shim is None:
        return False
    try:
        library = ctypes.CDLL(os.fspath(library_path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        slot = ctypes.c_void_p.in_dll(library, "__TVMBackendParallelLaunch")
    except (OSError, ValueError):
        return False
    return slot.value == ctypes.cast(shim.tvmgroup_parallel_launch, ctypes.c_void_p).value
