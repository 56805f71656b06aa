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
    for name in (roles.block, *roles.extra_blocks):
        _one_thread_per_output(sch, name, knobs)


def _one_thread_per_output(sch: s_tir.Schedule, name: str, knobs: Knobs) -> None:
    block = sch.get_sblock(name)
    n_reduce = sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == 2)
    loops = sch.get_loops(block)
    spatial, reduce = loops[: len(loops) - n_reduce], loops[len(loops) - n_reduce :]
    threads = knobs.inner_choice(sch, THREADS, 128)
    bx, tx = sch.split(sch.fuse(*spatial), [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    unroll = knobs.inner_choice(sch, UNROLL, 16)
    sch.annotate(reduce[0], "pragma_auto_unroll_max_step", unroll)
    sch.annotate(reduce[0], "pragma_unroll_explicit", 0)
    sch.decompose_reduction(block, reduce[0])
