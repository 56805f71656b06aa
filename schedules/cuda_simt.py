"""The CUDA SIMT schedule template: float32, and the plain row sums of every dtype.

One output element per thread: the output's spatial loops are fused, split into thread
blocks of ``threads`` threads, and each thread runs the whole reduction in a register and
stores its result once. Consecutive threads write consecutive elements of the contiguous
output axis, so stores are coalesced. Row counts need no multiple: the tail is a cheap
predicate on the GPU.
"""

from __future__ import annotations

from tvm import s_tir

from .knobs import Knobs
from .roles import loop_roles

THREADS = (64, 128, 256, 512)
UNROLL = (0, 16, 64)


def schedule_simt(sch: s_tir.Schedule, op: str, layout: str, bias: bool, knobs: Knobs) -> None:
    """Applies the template to the op's PrimFunc in ``sch``; its kernels take any row count."""
    roles = loop_roles(op, layout, bias)
    for name in roles.present_packs(sch):
        # Read the weight in place: an unbound stage would run on the host.
        sch.compute_inline(sch.get_sblock(name))
    for name in (roles.block, *roles.extra_blocks):
        one_thread_per_output(sch, name, knobs)


def one_thread_per_output(sch: s_tir.Schedule, name: str, knobs: Knobs) -> None:
    """Schedules reduction block ``name``: one thread per output, summing in a register."""
    block = sch.get_sblock(name)
    threads = knobs.inner_choice(sch, THREADS, 128)
    # float16/bfloat16 ops have a cast stage that stores the float32 sum; float32 ops get a
    # copy-out stage here, so the sum stays in a register instead of global memory.
    store = _cast_stage(sch, name) or sch.cache_write(block, 0, "global")
    tx = _bind_threads(sch, sch.get_loops(store), threads)
    sch.compute_at(block, tx)
    sch.set_scope(block, 0, "local")
    unroll = knobs.inner_choice(sch, UNROLL, 16)
    # Under the thread loop only reduction loops remain (one-iteration ones may be gone).
    reduce = [l for l in sch.get_loops(block) if not _is_bound(sch, l)]
    if not reduce:
        return
    first = reduce[0]
    sch.annotate(first, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(first, "pragma_unroll_explicit", 0)
    try:
        sch.decompose_reduction(block, first)
    except s_tir.ScheduleError:
        # Bindings through two symbolic extents (conv: B and L) are not quasi-affine; the
        # init then stays in the loop as a first-iteration branch.
        pass


def _bind_threads(sch: s_tir.Schedule, spatial: list, threads):
    bx, tx = sch.split(sch.fuse(*spatial), [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return tx


def _is_bound(sch: s_tir.Schedule, loop) -> bool:
    return sch.get(loop).thread_binding is not None


def _cast_stage(sch: s_tir.Schedule, name: str):
    try:
        return sch.get_sblock(f"{name}_out")
    except Exception:  # no such block: the op stores float32
        return None
