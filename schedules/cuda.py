"""The CUDA (SIMT) schedule template for every op and layout, float32.

One output element per thread: the output's spatial loops are fused, split into thread
blocks of ``threads`` threads, and each thread runs the whole reduction in a register.
Consecutive threads write consecutive elements of the contiguous output axis, so stores are
coalesced. Row counts need no multiple: the tail is a cheap predicate on the GPU.
"""

from __future__ import annotations

from tvm import s_tir

from .knobs import Knobs
from .roles import loop_roles

THREADS = (64, 128, 256, 512)
UNROLL = (0, 16, 64)


def schedule_cuda(sch: s_tir.Schedule, op: str, layout: str, bias: bool, knobs: Knobs, tail: bool = False) -> None:
    """Applies the template; its kernels take any row count (``tail`` changes nothing)."""
    roles = loop_roles(op, layout, bias)
    for name in roles.packs:
        # Read the weight in place: an unbound stage would run on the host.
        sch.compute_inline(sch.get_sblock(name))
    for name in (roles.block, *roles.extra_blocks):
        _one_thread_per_output(sch, name, knobs)


def _one_thread_per_output(sch: s_tir.Schedule, name: str, knobs: Knobs) -> None:
    block = sch.get_sblock(name)
    threads = knobs.inner_choice(sch, THREADS, 128)
    cast = _cast_stage(sch, name)
    if cast is None:
        n_reduce = sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == 2)
        loops = sch.get_loops(block)
        tx = _bind_threads(sch, loops[: len(loops) - n_reduce], threads)
    else:
        # float16/bfloat16: the thread sums in float32 and the cast stage stores its result.
        tx = _bind_threads(sch, sch.get_loops(cast), threads)
        sch.compute_at(block, tx)
        sch.set_scope(block, 0, "local")
    reduce = [l for l in sch.get_loops(block) if sch.get(l).kind == 0 and not _is_bound(sch, l)]
    first = reduce[-sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == 2)]
    sch.annotate(first, "pragma_auto_unroll_max_step", knobs.inner_choice(sch, UNROLL, 16))
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
