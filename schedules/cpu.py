"""The CPU (LLVM) schedule template for every op and layout.

A register-blocked GEMM micro-kernel: the output's contiguous axis is split and vectorised,
the "row" axis is split and unrolled, so each reduction step broadcasts one operand into
``row_tile`` fused multiply-adds on ``vector_tile`` lanes, with the accumulators in registers.
Outer loops are fused and run in parallel.

Symbolic loops in the micro-kernel are split *without* a tail predicate (a predicate there
costs 3-30x): in the ``"last"`` layout the row loop, so the kernel requires the row count to
be a multiple of its row tile and the caller runs the remaining rows through a build with
``tail=True``; in the ``"conv"`` layout the vectorised length loop, so the kernel requires L
to be a multiple of the tile and other lengths run wholly through the (predicated) tail
build (see :mod:`tvmgroup.kernel`). The tile is recorded on the
main block as the annotation ``ROW_TILE_KEY``, so a replayed trace carries it too. A
row count used for tuning must be a multiple of every candidate (``ROW_MULTIPLE``).
"""

from __future__ import annotations

from tvm import s_tir

from .knobs import Knobs
from .roles import ROW_TILE_KEY, loop_roles

ROW_TILES = (1, 2, 4, 8)  # symbolic row tile of forward / grad_input ("last")
ROW_CHUNKS = (16, 32, 64, 128, 256)  # symbolic row chunk of grad_weight ("last")
VECTOR_TILES = (8, 16, 32, 64)  # symbolic vector tile ("conv": the L axis)
ROW_MULTIPLE = 256  # lcm of ROW_TILES and ROW_CHUNKS


def schedule_cpu(sch: s_tir.Schedule, op: str, layout: str, bias: bool, knobs: Knobs, tail: bool = False) -> None:
    """Applies the template to the op's PrimFunc in ``sch``."""
    roles = loop_roles(op, layout, bias)
    if op == "grad_weight":
        row_tile = _schedule_weight_grad(sch, roles, layout, knobs, tail)
    else:
        row_tile = _schedule_rows(sch, roles, layout, knobs, tail)
    sch.annotate(sch.get_sblock(roles.block + "_update"), ROW_TILE_KEY, row_tile)
    for name in roles.extra_blocks:
        _schedule_column_sum(sch, name)


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _split_static(sch, loop, knobs: Knobs, limit: int, default: int):
    factor = knobs.inner_static(sch, loop, _extent(sch, loop), limit, default)
    return sch.split(loop, [None, factor])


def _split_symbolic(sch, loop, knobs: Knobs, candidates, default: int, exact: bool):
    """Splits a symbolic loop; ``exact`` drops the tail predicate (the caller pads the rows)."""
    factor = knobs.inner_choice(sch, candidates, default)
    return factor, sch.split(loop, [None, factor], disable_predication=exact)


def _schedule_rows(sch, roles, layout: str, knobs: Knobs, tail: bool):
    """forward and grad_input: out[row, g, j] = sum_r a[row, g, r] * b[g, r, j]."""
    block = sch.get_sblock(roles.block)
    loops = sch.get_loops(block)
    spatial, reduce = loops[: roles.n_spatial], loops[roles.n_spatial :]
    row, vec = spatial[roles.row], spatial[-1]
    outer = [l for i, l in enumerate(spatial) if i not in (roles.row, roles.n_spatial - 1)]
    row_tile = 1
    if layout == "last":
        v0, v1 = _split_static(sch, vec, knobs, 64, 32)
        if tail:
            r0, r1 = sch.split(row, [None, 1])
        else:
            row_tile, (r0, r1) = _split_symbolic(sch, row, knobs, ROW_TILES, 4, exact=True)
        sch.reorder(r0, *outer, v0, *reduce, r1, v1)
        cache = _accumulate_locally(sch, block, v0, tail)
        sch.parallel(sch.fuse(r0, *outer, v0))
    else:
        # The vector axis is the symbolic length L: exact split, or predicated for the tail build.
        tile, (v0, v1) = _split_symbolic(sch, vec, knobs, VECTOR_TILES, 32, exact=not tail)
        row_tile = 1 if tail else tile
        r0, r1 = _split_static(sch, row, knobs, 8, 4)
        sch.reorder(*outer, r0, v0, *reduce, r1, v1)
        cache = _accumulate_locally(sch, block, v0, tail)
        sch.parallel(sch.fuse(*outer, r0))
    sch.unroll(r1)
    sch.vectorize(v1)
    if cache is not None:
        sch.vectorize(sch.get_loops(cache)[-1])
    sch.decompose_reduction(block, reduce[0])
    return row_tile


def _accumulate_locally(sch, block, loop, tail: bool):
    """Accumulates the output tile in a local buffer written back under ``loop``.

    It keeps the accumulators in registers where the compiler would otherwise reload and
    store them every reduction step. Not for tail builds: their tiles are predicated.
    """
    if tail:
        return None
    cache = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(cache, loop)
    return cache


def _schedule_weight_grad(sch, roles, layout: str, knobs: Knobs, tail: bool):
    """grad_weight[g, o, k] = sum over rows of grad_y[row, g, o] * x[row, g, k]."""
    block = sch.get_sblock(roles.block)
    g, o, k, *reduce = sch.get_loops(block)
    o0, o1 = _split_static(sch, o, knobs, 8, 4)
    k0, k1 = _split_static(sch, k, knobs, 64, 32)
    row_tile = 1
    if layout == "last":
        # Rows in chunks that stay in cache while every (o, k) tile of the group reads them.
        if tail:
            n0, n1 = sch.split(reduce[0], [None, 1])
        else:
            row_tile, (n0, n1) = _split_symbolic(sch, reduce[0], knobs, ROW_CHUNKS, 64, exact=True)
        sch.reorder(g, n0, o0, k0, n1, o1, k1)
        first_reduce = n0
    else:
        sch.reorder(g, o0, k0, *reduce, o1, k1)
        first_reduce = reduce[0]
    sch.parallel(g)
    sch.unroll(o1)
    sch.vectorize(k1)
    sch.decompose_reduction(block, first_reduce)
    return row_tile


def _schedule_column_sum(sch: s_tir.Schedule, name: str) -> None:
    """grad_bias[g, o] = sum over rows: rows outside, o vectorised inside, g in parallel."""
    block = sch.get_sblock(name)
    g, o, *reduce = sch.get_loops(block)
    sch.reorder(g, *reduce, o)
    sch.parallel(g)
    sch.vectorize(o)
    sch.decompose_reduction(block, reduce[0])
