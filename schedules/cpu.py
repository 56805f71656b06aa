"""The CPU (LLVM) schedule template for every op and layout.

A register-blocked GEMM micro-kernel: the output's contiguous axis is split and vectorised,
the "row" axis is split and unrolled, so each reduction step broadcasts one operand into
``row_tile`` fused multiply-adds on ``vector_tile`` lanes, with the accumulators in registers.
The outer loops run in parallel: the row tiles (each thread walks every group of its rows),
or, for large groups (panels), the groups and blocks of output features.

Symbolic loops in the micro-kernel are split *without* a tail predicate (a predicate there
costs 3-30x). Where the features are innermost (``"last"``) that is the row loop, so the
kernel requires the row count to be a multiple of its row tile and the caller runs the
remaining rows through a build with ``tail=True``; where a row axis is innermost
(``"conv"``'s length L, :attr:`~tvmgroup.layouts.Layout.rows_innermost`) it is the vectorised
length loop, so the kernel requires L to be a multiple of the tile and the caller pads
other lengths (see :mod:`tvmgroup.kernel`). The tile is recorded on the
main block as the annotation ``ROW_TILE_KEY``, so a replayed trace carries it too. A
row count used for tuning must be a multiple of every candidate (``ROW_MULTIPLE``).

Where the groups are innermost (``"groups_last"``, kernel view ``(N, F, G)``) the template
has a section of its own at the end of this module: vectorised across the groups, or along
the features on row tiles first copied features innermost (then the micro-kernel above).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Iterator

from tvm import s_tir

from tvmgroup.layouts import layout_of
from tvmgroup.opdefs import GROUPS_PACK, vectorises_groups

from .knobs import Knobs
from .roles import ROW_TILE_BLOCKS_KEY, ROW_TILE_KEY, STRUCTURE_KEY, loop_roles, op_parts

ROW_TILES = (1, 2, 4, 8)  # symbolic row tile of forward / grad_input ("last")
ROW_CHUNKS = (16, 32, 64, 128, 256)  # symbolic row chunk of grad_weight ("last")
VECTOR_TILES = (8, 16, 32, 64)  # symbolic vector tile ("conv": the L axis)
LANE_TILES = (8, 16, 32)  # lanes of grad_weight's partial sums along L ("conv")
ONE_PASS_CHUNKS = (8, 16, 32, 64)  # rows of grad_y read once for grad_x and grad_weight
VECTOR_ALIGN = 16  # static vector loops are partitioned into a multiple of this + remainder
# Panels (large groups, features innermost): the weight is read as panels of PANEL_LANES
# output features, PANEL_VECTORS of them per register tile; a group's panel stays in cache
# while every row streams past it. Serves when both feature counts reach PANEL_MIN.
PANEL_LANES = 16
PANEL_VECTORS = 4  # at most this many panels per register tile
PANEL_MIN = 128


# Sums over rows ("last", "ensemble"): the parallel loop runs over this many blocks of the
# output's tiles (about one per core), each of which walks every chunk of rows over its
# tiles. One parallel region per call: a region per row chunk (N/16 of them) made each call
# wait at N/16 barriers, and one preempted thread stalled them all (10-20x slower under load).
PARALLEL_BLOCKS = os.cpu_count() or 1
# A multiple of every row tile a candidate may have: ROW_TILES, ROW_CHUNKS, and the one-pass
# backward's PARALLEL_BLOCKS chunks (256 on machines of up to 4 cores).
ROW_MULTIPLE = math.lcm(256, PARALLEL_BLOCKS * max(ONE_PASS_CHUNKS))


def _blocks(extent: int, threads: int = PARALLEL_BLOCKS) -> int:
    """How many blocks ``extent`` tiles are split into (a divisor of it): the one that keeps
    ``threads`` threads busiest, fewest blocks first (each block rereads the rows)."""
    if extent <= threads:
        return extent
    candidates = [d for d in range(threads, min(extent, 8 * threads) + 1) if extent % d == 0]
    if not candidates:
        return extent
    return min(candidates, key=lambda d: (math.ceil(d / threads) * threads / d, d))


def _parallel_blocks_over_chunks(sch: s_tir.Schedule, tiles, chunks, in_chunk) -> None:
    """Splits the fused loop ``tiles`` into :func:`_blocks` parallel blocks and moves the row
    chunk loop (``chunks``, then ``in_chunk``) between a block and its tiles."""
    blocks, in_block = sch.split(tiles, [_blocks(_extent(sch, tiles)), None])
    sch.reorder(blocks, chunks, in_block, in_chunk)
    _parallel(sch, blocks)


# Set while building a kernel for small calls: the outer loops stay serial, since waking TVM's
# thread pool costs more than such a call's work (several microseconds per launch).
_SERIAL: contextvars.ContextVar[bool] = contextvars.ContextVar("tvmgroup_serial_loops", default=False)


@contextlib.contextmanager
def serial_loops() -> Iterator[None]:
    """Within this block the template leaves its parallel loops serial."""
    token = _SERIAL.set(True)
    try:
        yield
    finally:
        _SERIAL.reset(token)


def _parallel(sch: s_tir.Schedule, loop) -> None:
    if not _SERIAL.get():
        sch.parallel(loop)


# Layouts whose fused backward ("backward": grad_input and grad_weight in one kernel) this
# template schedules; on any other layout the backward runs the two ops
# (:func:`tvmgroup.schedules.supports`).
FUSED_BACKWARD_LAYOUTS = frozenset({"last", "conv", "ensemble", "heads"})


# The loop structures the template has for an op on a layout, by (op, layout); the first is
# the default, every op has it. Each is a design space of its own (``knobs.Knobs.structure``).
STRUCTURES: dict[tuple[str, str], tuple[str, ...]] = {
    ("backward", "last"): ("parts", "one_pass_groups", "one_pass_rows"),
}


def cpu_structures(op: str, layout: str) -> tuple[str, ...]:
    """The names of the template's loop structures for ``op`` on ``layout``, default first."""
    return STRUCTURES.get((op, layout), ("default",))


def schedule_cpu(sch: s_tir.Schedule, op: str, layout: str, bias: bool, knobs: Knobs, tail: bool = False) -> None:
    """Applies the template to the op's PrimFunc in ``sch``, in the structure ``knobs`` names.

    An op made of parts (the fused backward, :func:`~.roles.op_parts`) has each part
    scheduled as its op is, in one PrimFunc: one call, one launch. Its row tile is the
    largest of the parts' (each a power of two, so a multiple of the others). Its
    ``one_pass_*`` structures read grad_y once for both parts instead (:data:`ONE_PASS`).
    A tail build always takes the default structure: it runs the rows a main kernel's row
    tile leaves over, in any structure.
    """
    if op == "backward" and layout not in FUSED_BACKWARD_LAYOUTS:
        raise ValueError(f"the CPU template has no fused backward for layout {layout!r}")
    structures = cpu_structures(op, layout)
    if not 0 <= knobs.structure < len(structures):
        raise ValueError(
            f"structure {knobs.structure} of {op} on layout {layout!r}: the CPU template has "
            f"{len(structures)} ({', '.join(structures)})"
        )
    if not tail and structures[knobs.structure] in ONE_PASS:
        ONE_PASS[structures[knobs.structure]](sch, bias, knobs)
        return
    for part in op_parts(op):
        _schedule_op(sch, part, layout, bias, knobs, tail)


def _schedule_op(sch: s_tir.Schedule, op: str, layout: str, bias: bool, knobs: Knobs, tail: bool) -> None:
    """Schedules the blocks of single op ``op`` (the whole PrimFunc, or one part of it)."""
    roles = loop_roles(op, layout, bias)
    if layout_of(layout).groups_innermost:
        if _groups_in_lanes(sch, op, layout, roles):
            _schedule_groups_in_lanes(sch, op, roles, knobs, tail)
        else:
            _schedule_groups_features(sch, op, roles, knobs, tail)
        return
    rows_innermost = layout_of(layout).rows_innermost
    # With rows innermost, grad_weight vectorises the summed rows, not its static vector loop:
    # no partition.
    nests = _nests(sch, roles, partition=not (op == "grad_weight" and rows_innermost))
    if op == "grad_weight":
        row_tile = _schedule_weight_grad(sch, nests, rows_innermost, knobs, tail)
    else:
        row_tile = _schedule_rows(sch, nests, rows_innermost, knobs, tail)
    for nest in nests:
        sch.annotate(nest.block, ROW_TILE_KEY, row_tile)
    for name in roles.extra_blocks:
        if rows_innermost and not tail:
            _conv_column_sum_in_lanes(sch, name, row_tile)
        else:
            _schedule_column_sum(sch, name, 1 if rows_innermost else row_tile)
    for name in roles.present_packs(sch):
        if not _is_packed_in_panels(sch, name):
            _schedule_pack(sch, name)


def _schedule_pack(sch: s_tir.Schedule, name: str) -> None:
    """A weight transpose (G*K*O elements, once per call): groups in parallel."""
    g, *_ = sch.get_loops(sch.get_sblock(name))
    _parallel(sch, g)


@dataclass
class _Nest:
    """One loop nest of the main block, its loops by role."""

    block: s_tir.schedule.SBlockRV
    outer: list  # spatial loops that are neither the row nor the vector loop
    row: s_tir.schedule.LoopRV
    vec: s_tir.schedule.LoopRV
    reduce: list


def _nests(sch: s_tir.Schedule, roles, partition: bool = True) -> list[_Nest]:
    """The main block's loop nest, or two if its static vector loop needs a remainder.

    A vector length that is not a power of two compiles to gathers and runs ~10x slower, so
    a static vector extent that is not a multiple of ``VECTOR_ALIGN`` is partitioned into a
    multiple of it and a short remainder, each a nest of its own.
    """
    block = sch.get_sblock(roles.block)
    loops = sch.get_loops(block)
    n = roles.n_spatial
    spatial, reduce = loops[:n], loops[n:]
    vec, others = spatial[-1], spatial[:-1]
    extent = None if roles.vector_symbolic else _extent(sch, vec)
    if not partition or extent is None or extent % VECTOR_ALIGN == 0 or extent < VECTOR_ALIGN:
        return [_nest(block, others, roles.row, vec, reduce)]
    name = sch.get(vec).loop_var.name
    sch.reorder(vec, *others)
    sch.loop_partition(vec, [extent // VECTOR_ALIGN * VECTOR_ALIGN, None])
    nests = []
    for part in (0, 1):
        part_block = sch.get_sblock(f"{roles.block}_{name}{part}")
        part_loops = sch.get_loops(part_block)
        nests.append(_nest(part_block, part_loops[1:n], roles.row, part_loops[0], part_loops[n:]))
    return nests


def _nest(block, others: list, row_index: int, vec, reduce: list) -> _Nest:
    outer = [l for i, l in enumerate(others) if i != row_index]
    return _Nest(block, outer, others[row_index], vec, list(reduce))


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _split_static(sch, loop, knobs: Knobs, limit: int, default: int):
    factor = knobs.inner_static(sch, loop, _extent(sch, loop), limit, default)
    return sch.split(loop, [None, factor])


def _uses_panels(sch, nests: list[_Nest], rows_innermost: bool) -> bool:
    if rows_innermost or len(nests) != 1:
        return False
    (nest,) = nests
    vec, red = _extent(sch, nest.vec), _extent(sch, nest.reduce[0])
    return vec % PANEL_LANES == 0 and min(vec, red) >= PANEL_MIN


def _is_packed_in_panels(sch, name: str) -> bool:
    """Whether the panel schedule already placed the pack stage ``name`` (under the nest)."""
    return len(sch.get_loops(sch.get_sblock(name))) > 3


def _schedule_rows_in_panels(sch, nest: _Nest, knobs: Knobs, tail: bool) -> int:
    """forward and grad_input of large groups, features innermost: a GEMM per group.

    Loop order: group, panel block (parallel), row tile, reduction, then the register tile
    (rows x panels x lanes). The weight operand is copied into ``[G][J/16][R][16]`` panels
    inside the parallel loop, so the tile reads it contiguously and a block's panels stay in
    cache while all rows stream by.
    """
    block = nest.block
    (g,) = nest.outer
    row_tile = 1 if tail else knobs.inner_choice(sch, ROW_TILES, 8)
    panels, lanes = sch.split(nest.vec, [None, PANEL_LANES])
    p0, p1 = knobs.perfect_tile(sch, panels, 2, PANEL_VECTORS, [2])
    j0, j1 = sch.split(panels, [p0, p1])
    r0, r1 = sch.split(nest.row, [None, row_tile], disable_predication=True)
    (red,) = nest.reduce
    sch.reorder(g, j0, r0, red, r1, j1, lanes)
    # The weight operand as (G, R, J): the forward's pack stage, or a copy made here for
    # grad_input (its block reads (grad_y, weight)); either is laid out in panels.
    packs = [b for b in sch.get_producers(block) if sch.get(b).name_hint.endswith("_packed")]
    pack = packs[0] if packs else sch.cache_read(block, 1, "global")
    sch.transform_layout(pack, ("write", 0), lambda g_, r_, j_: (g_, j_ // PANEL_LANES, r_, j_ % PANEL_LANES))
    sch.compute_at(pack, j0, preserve_unit_loops=True)
    cache = _accumulate_locally(sch, block, r0, tail)
    _parallel(sch, sch.fuse(g, j0))
    sch.unroll(r1)
    sch.unroll(j1)
    sch.vectorize(lanes)
    if cache is not None:
        sch.vectorize(sch.get_loops(cache)[-1])
    sch.decompose_reduction(block, red)
    return row_tile


def _schedule_rows(sch, nests: list[_Nest], rows_innermost: bool, knobs: Knobs, tail: bool) -> int:
    """forward and grad_input: out[row, g, j] = sum_r a[row, g, r] * b[g, r, j]."""
    if _uses_panels(sch, nests, rows_innermost):
        return _schedule_rows_in_panels(sch, nests[0], knobs, tail)
    if not rows_innermost:
        # One row tile for every nest: the kernel's callers split rows by it.
        main, *remainder = nests
        rows, lanes = _default_register_tile(_extent(sch, main.vec))
        row_tile = 1 if tail else knobs.inner_choice(sch, ROW_TILES, rows)
        v0, v1 = _split_static(sch, main.vec, knobs, 64, lanes)
        r0, r1 = sch.split(main.row, [None, row_tile], disable_predication=True)
        sch.reorder(r0, *main.outer, v0, *main.reduce, r1, v1)
        cache = _accumulate_locally(sch, main.block, v0, tail or bool(remainder))
        # Only the row tiles run in parallel, each thread walking every group and vector
        # block of its rows. With the group and vector loops fused into the parallel loop
        # as well (one register tile per parallel iteration) the forward ran 1.1-1.8x slower
        # where K and O are 16-64 (docs/performance.md, "Parallel grain").
        _parallel(sch, r0)
        _finish_micro_kernel(sch, main, r1, v1, cache)
        for nest in remainder:
            r0, r1 = sch.split(nest.row, [None, row_tile], disable_predication=True)
            sch.reorder(r0, *nest.outer, *nest.reduce, r1, nest.vec)
            _parallel(sch, r0)
            _finish_micro_kernel(sch, nest, r1, nest.vec, None)
        return row_tile
    # Rows innermost (conv): the vector loop is the symbolic length L: exact split, predicated
    # in the tail build.
    (nest,) = nests
    tile = knobs.inner_choice(sch, VECTOR_TILES, 32)
    v0, v1 = sch.split(nest.vec, [None, tile], disable_predication=not tail)
    r0, r1 = _split_static(sch, nest.row, knobs, 8, 4)
    sch.reorder(*nest.outer, r0, v0, *nest.reduce, r1, v1)
    cache = _accumulate_locally(sch, nest.block, v0, tail)
    _parallel(sch, sch.fuse(*nest.outer, r0))
    _finish_micro_kernel(sch, nest, r1, v1, cache)
    return 1 if tail else tile


def _default_register_tile(features: int) -> tuple[int, int]:
    """The default register tile (rows, lanes) over ``features`` outputs: 8 rows of 32
    lanes, or 4 rows of all 64 where a group has 64 (each input row is then read once per
    group; 1.09x at 4096,32,64,64, docs/performance.md). Both hold 16 AVX-512 accumulators."""
    return (4, 64) if features == 64 else (8, 32)


def _finish_micro_kernel(sch, nest: _Nest, unrolled, vectorised, cache) -> None:
    sch.unroll(unrolled)
    sch.vectorize(vectorised)
    if cache is not None:
        sch.vectorize(sch.get_loops(cache)[-1])
    sch.decompose_reduction(nest.block, nest.reduce[0])


def _accumulate_locally(sch, block, loop, tail: bool):
    """Accumulates the output tile in a local buffer written back under ``loop``.

    It keeps the accumulators in registers where the compiler would otherwise reload and
    store them every reduction step. Not for tail builds: their tiles are predicated.
    """
    if tail:
        return None
    cache = sch.cache_write(block, 0, "local")
    # Unit loops kept: the loop count must not depend on sampled tiles, or traces won't replay.
    sch.reverse_compute_at(cache, loop, preserve_unit_loops=True)
    return cache


# grad_weight's register tile: (largest, default) output features per tile, by K. Where K fits
# one vector (16 lanes or fewer) a tile of up to 16 outputs takes a whole 16 x 16 group (the
# default 4 ran 1.11-1.20x slower there, docs/performance.md); elsewhere 8 outputs at most.
GRAD_WEIGHT_O_TILE = (8, 4)
GRAD_WEIGHT_ONE_VECTOR = 16
GRAD_WEIGHT_O_TILE_ONE_VECTOR = (16, 16)


def _schedule_weight_grad(sch, nests: list[_Nest], rows_innermost: bool, knobs: Knobs, tail: bool) -> int:
    """grad_weight[g, o, k] = sum over rows of grad_y[row, g, o] * x[row, g, k]."""
    if rows_innermost and not tail:
        (nest,) = nests
        return _conv_weight_grad_in_lanes(sch, nest, knobs)
    chunk = 1
    if not rows_innermost and not tail:
        chunk = knobs.inner_choice(sch, ROW_CHUNKS, 16)
    for i, nest in enumerate(nests):
        (g,) = nest.outer
        o_limit, o_default = GRAD_WEIGHT_O_TILE
        if i == 0:
            if _extent(sch, nest.vec) <= GRAD_WEIGHT_ONE_VECTOR:
                o_limit, o_default = GRAD_WEIGHT_O_TILE_ONE_VECTOR
            k0, k1 = _split_static(sch, nest.vec, knobs, 64, 64)
        else:  # the remainder of a partitioned vector loop: short, starts past 0
            k0, k1 = sch.add_unit_loop(nest.vec), nest.vec
        o0, o1 = _split_static(sch, nest.row, knobs, o_limit, o_default)
        if not rows_innermost:
            # Each parallel block of (group, o, k) tiles reads a chunk of rows once for all
            # its tiles before the next chunk: the chunk loop sits between the blocks and
            # their tiles.
            n0, n1 = sch.split(nest.reduce[0], [None, chunk], disable_predication=True)
            sch.reorder(g, o0, k0, n0, n1, o1, k1)
            _parallel_blocks_over_chunks(sch, sch.fuse(g, o0, k0), n0, n1)
            nest.reduce = [n0, n1]
        else:
            sch.reorder(g, o0, k0, *nest.reduce, o1, k1)
            _parallel(sch, sch.fuse(g, o0, k0))
        _finish_micro_kernel(sch, nest, o1, k1, None)
    return chunk


def _conv_weight_grad_in_lanes(sch, nest: _Nest, knobs: Knobs) -> int:
    """grad_weight in the conv layout: both operands are contiguous along the summed L.

    L is split exactly into vector lanes and ``rfactor`` turns the lanes into a spatial axis
    of a small per-tile buffer of partial sums (``o_tile x k_tile x lanes``, kept local),
    which the tile reduces across lanes at the end. The kernel needs L % lanes == 0.
    """
    (g,) = nest.outer
    b, l = nest.reduce
    lanes = knobs.inner_choice(sch, LANE_TILES, 16)
    l0, l1 = sch.split(l, [None, lanes], disable_predication=True)
    o0, o1 = _split_static(sch, nest.row, knobs, 8, 4)
    k0, k1 = _split_static(sch, nest.vec, knobs, 8, 4)
    sch.reorder(g, o0, k0, b, l0, o1, k1, l1)
    partial = sch.rfactor(l1, factor_axis=3)
    g, o0, k0, *_ = sch.get_loops(partial)  # rfactor gave the original loops to the final sum
    sch.reverse_compute_at(nest.block, k0)
    sch.set_scope(partial, 0, "local")
    _parallel(sch, sch.fuse(g, o0, k0))
    _, b, _, o1, k1, l1 = sch.get_loops(partial)
    sch.unroll(o1)
    sch.unroll(k1)
    sch.vectorize(l1)
    sch.decompose_reduction(partial, b)
    return lanes


def _conv_column_sum_in_lanes(sch: s_tir.Schedule, name: str, lanes: int) -> None:
    """grad_bias in the conv layout: sums along the contiguous L in vector lanes (rfactor)."""
    block = sch.get_sblock(name)
    g, o, b, l = sch.get_loops(block)
    l0, l1 = sch.split(l, [None, lanes], disable_predication=True)
    partial = sch.rfactor(l1, factor_axis=2)
    g, o, *_ = sch.get_loops(partial)
    sch.reverse_compute_at(block, o)
    sch.set_scope(partial, 0, "local")
    _parallel(sch, sch.fuse(g, o))
    _, b, _, l1 = sch.get_loops(partial)
    sch.vectorize(l1)
    sch.decompose_reduction(partial, b)


def _schedule_column_sum(sch: s_tir.Schedule, name: str, chunk: int) -> None:
    """grad_bias[g, o] = sum over rows, read in the same row chunks as grad_weight's nest."""
    block = sch.get_sblock(name)
    g, o, *reduce = sch.get_loops(block)
    extent = _extent(sch, o)
    o0, o1 = sch.split(o, [None, max(d for d in (1, 2, 4, 8, 16, 32, 64) if extent % d == 0)])
    if not isinstance(chunk, int) or chunk > 1:  # a sampled chunk (tuning) is always > 1
        # Blocks of (group, o) columns in parallel, each walking the row chunks (see
        # PARALLEL_BLOCKS).
        n0, n1 = sch.split(reduce[0], [None, chunk], disable_predication=True)
        sch.reorder(g, o0, n0, n1, o1)
        _parallel_blocks_over_chunks(sch, sch.fuse(g, o0), n0, n1)
        reduce = [n0, n1]
    else:
        sch.reorder(g, *reduce, o0, o1)
        _parallel(sch, g)
    sch.vectorize(o1)
    sch.decompose_reduction(block, reduce[0])


# -- groups innermost ("groups_last"): every lane of a vector computes a group of its own ---------

GROUP_LANES = 16  # lanes of a vector across the groups, where they divide the groups


def _groups_in_lanes(sch: s_tir.Schedule, op: str, layout: str, roles) -> bool:
    """Whether an op of a groups-innermost layout vectorises across the groups: forward and
    grad_input when their compute packed the weight for it, grad_weight by the same rule
    (:func:`tvmgroup.opdefs.vectorises_groups`, its features being K)."""
    if op != "grad_weight":
        return GROUPS_PACK in roles.present_packs(sch)
    groups, _, in_features = (_extent(sch, l) for l in sch.get_loops(sch.get_sblock(roles.block))[:3])
    return vectorises_groups(layout_of(layout), groups, in_features)


def _schedule_groups_in_lanes(sch: s_tir.Schedule, op: str, roles, knobs: Knobs, tail: bool) -> None:
    """An op of a groups-innermost layout (kernel view ``(N, F, G)``), each lane a group.

    The register tile blocks two more axes, so every reduction step loads ``a + b`` vectors
    for ``a * b`` fused multiply-adds: (rows x output features) for forward and grad_input,
    which read the weight packed ``(R, J, G)``; (O x K) for grad_weight, which sums over all
    rows in local accumulators laid out groups innermost and writes them back as the weight
    is stored. The groups are never partitioned (local accumulators do not survive a
    partition): :func:`_split_groups` picks the lanes.
    """
    if op == "grad_weight":
        # Spatial loops (g, o, k) -> (o, k, g): the groups become the vector loop.
        g, o, k, *_ = sch.get_loops(sch.get_sblock(roles.block))
        sch.reorder(o, k, g)
        (nest,) = _nests(sch, dataclasses.replace(roles, row=0), partition=False)
        # Rows are summed in one sweep: any row count, so no row tile is recorded (1).
        _groups_weight_grad_tile(sch, nest, knobs, tail)
        for name in roles.extra_blocks:
            _groups_column_sum(sch, name, tail)
        return
    (nest,) = _nests(sch, roles, partition=False)  # spatial (n, j, g): row n, outer j, vector g
    row_tile = 1 if tail else knobs.inner_choice(sch, ROW_TILES, 4)
    (j,) = nest.outer
    v0, v1 = _split_groups(sch, nest.vec)
    j0, j1 = _split_static(sch, j, knobs, 8, 4)
    r0, r1 = sch.split(nest.row, [None, row_tile], disable_predication=True)
    sch.reorder(r0, j0, v0, *nest.reduce, r1, j1, v1)
    cache = _accumulate_locally(sch, nest.block, v0, tail)
    _parallel(sch, sch.fuse(r0, j0, v0))
    sch.unroll(j1)
    _finish_micro_kernel(sch, nest, r1, v1, cache)
    sch.annotate(nest.block, ROW_TILE_KEY, row_tile)
    for name in roles.present_packs(sch):
        _schedule_pack(sch, name)


def _schedule_groups_features(sch: s_tir.Schedule, op: str, roles, knobs: Knobs, tail: bool) -> None:
    """An op of a groups-innermost layout with the features vectorised, as in "last".

    Each row tile (forward, grad_input) or row chunk (grad_weight) of the row-indexed inputs
    is first copied features innermost into a tile-sized buffer (``(rows, G, F)``, in
    cache), which the "last" micro-kernel then reads contiguously: the user's tensors are
    read once, in place, in memory order. y is written back from the tile's accumulators.
    """
    block = sch.get_sblock(roles.block)
    if op == "grad_weight":
        (nest,) = _nests(sch, roles, partition=False)
        (g,) = nest.outer
        chunk = 1 if tail else knobs.inner_choice(sch, ROW_CHUNKS, 16)
        k0, k1 = _split_static(sch, nest.vec, knobs, 64, 64)
        o0, o1 = _split_static(sch, nest.row, knobs, 8, 4)
        n0, n1 = sch.split(nest.reduce[0], [None, chunk], disable_predication=True)
        sch.reorder(n0, g, o0, k0, n1, o1, k1)
        if not tail:
            for index in (0, 1):  # grad_y, x
                _pack_rows_features_last(sch, block, index, n0)
        _parallel(sch, sch.fuse(g, o0, k0))
        nest.reduce = [n0, n1]
        _finish_micro_kernel(sch, nest, o1, k1, None)
        sch.annotate(block, ROW_TILE_KEY, chunk)
        for name in roles.extra_blocks:
            _groups_column_sum(sch, name, tail)
        return
    n, j, g, *_ = sch.get_loops(block)
    sch.reorder(g, j)  # spatial (n, g, j): the features innermost, as "last" has them
    (nest,) = _nests(sch, roles, partition=False)  # one nest: its tile accumulates locally
    row_tile = 1 if tail else knobs.inner_choice(sch, ROW_TILES, 8)
    (g,) = nest.outer
    v0, v1 = _split_static(sch, nest.vec, knobs, 64, 32)
    r0, r1 = sch.split(nest.row, [None, row_tile], disable_predication=True)
    sch.reorder(r0, g, v0, *nest.reduce, r1, v1)
    cache = _accumulate_locally(sch, block, v0, tail)
    if tail:  # a few rows: read in place
        _parallel(sch, sch.fuse(r0, g, v0))
    else:  # the row tiles in parallel, each packing its rows once for all groups
        _pack_rows_features_last(sch, block, 0, r0)
        _parallel(sch, r0)
    _finish_micro_kernel(sch, nest, r1, v1, cache)
    sch.annotate(block, ROW_TILE_KEY, row_tile)
    for name in roles.present_packs(sch):
        _schedule_pack(sch, name)


def _pack_rows_features_last(sch: s_tir.Schedule, block, index: int, loop) -> None:
    """Copies the rows of ``block``'s row-indexed input ``index`` that ``loop`` covers into a
    buffer laid out ``(N, G, F)`` (features innermost)."""
    pack = sch.cache_read(block, index, "global", consumer_blocks=[block])
    sch.transform_layout(pack, ("write", 0), lambda n, f, g: (n, g, f))
    sch.compute_at(pack, loop, preserve_unit_loops=True)


def _split_groups(sch: s_tir.Schedule, vec):
    """The groups' loop as (vectors, lanes): ``GROUP_LANES`` lanes or the largest divisor of
    the groups below it (8 for 24 groups; groups that fill no vector, taken this way only
    when the features fill none either: 7 for 7, 3 for 321)."""
    extent = _extent(sch, vec)
    if extent <= GROUP_LANES:
        return sch.add_unit_loop(vec), vec
    return sch.split(vec, [None, max(d for d in range(1, GROUP_LANES + 1) if extent % d == 0)])


def _groups_weight_grad_tile(sch: s_tir.Schedule, nest: _Nest, knobs: Knobs, tail: bool) -> None:
    """grad_weight[g, o, k] = sum over rows of grad_y[n, o, g] * x[n, k, g], groups in lanes.

    The (o, k) register tile's accumulators live in a local buffer laid out ``(O, K, G)`` (so
    the lanes are contiguous), written back to the weight's storage once, after all rows.
    """
    block = nest.block
    (k,) = nest.outer
    (n,) = nest.reduce
    o0, o1 = _split_static(sch, nest.row, knobs, 8, 4)
    k0, k1 = _split_static(sch, k, knobs, 8, 4)
    v0, v1 = _split_groups(sch, nest.vec)
    sch.reorder(o0, k0, v0, n, o1, k1, v1)
    if not tail:
        cache = sch.cache_write(block, 0, "local")
        sch.transform_layout(block, ("write", 0), _groups_last_index)
        sch.reverse_compute_at(cache, v0, preserve_unit_loops=True)
    _parallel(sch, sch.fuse(o0, k0, v0))
    sch.unroll(o1)
    sch.unroll(k1)
    sch.vectorize(v1)
    sch.decompose_reduction(block, n)


def _groups_last_index(g, a, b):
    """A ``(G, A, B)`` buffer's index laid out groups innermost."""
    return (a, b, g)


def _groups_column_sum(sch: s_tir.Schedule, name: str, tail: bool) -> None:
    """grad_bias[g, o] = sum over rows of grad_y[n, o, g]: output features in parallel, the
    groups in lanes, summed in a local ``(O, G)`` buffer."""
    block = sch.get_sblock(name)
    g, o, n = sch.get_loops(block)
    sch.reorder(o, n, g)
    if not tail:
        cache = sch.cache_write(block, 0, "local")
        sch.transform_layout(block, ("write", 0), lambda g_, o_: (o_, g_))
        sch.reverse_compute_at(cache, o, preserve_unit_loops=True)
    _parallel(sch, o)
    sch.vectorize(g)
    sch.decompose_reduction(block, n)


# -- the fused backward in one pass over grad_y ("last") --------------------------------------

# Both structures read a chunk of grad_y's rows once for grad_x, grad_weight and grad_bias
# while it is in cache; their loops are joined with ``Schedule.merge``. Each block keeps the
# register tile its single op uses. Where each pays: docs/performance.md, "The fused backward
# in one pass".


def _schedule_backward_one_pass_groups(sch: s_tir.Schedule, bias: bool, knobs: Knobs) -> None:
    """Blocks of groups in parallel (each thread owns its groups' grad_weight: no partial
    sums); per chunk of rows and per group, the grad_x tile, then grad_weight and grad_bias.
    The kernel needs the row count to be a multiple of the chunk (its row tile)."""
    gx, gw = sch.get_sblock("grad_x"), sch.get_sblock("grad_weight")
    n, g, k, o = sch.get_loops(gx)
    blocks = _blocks(_extent(sch, g))
    chunk = knobs.inner_choice(sch, ONE_PASS_CHUNKS, 8)  # at least the largest row tile
    rows, lanes = _default_register_tile(_extent(sch, k))
    row_tile = knobs.inner_choice(sch, ROW_TILES, rows)
    g0, g1 = sch.split(g, [blocks, None])
    c, r = sch.split(n, [None, chunk], disable_predication=True)
    r0, r1 = sch.split(r, [None, row_tile])
    k0, k1 = _split_static(sch, k, knobs, 64, lanes)
    sch.reorder(g0, c, g1, r0, k0, o, r1, k1)
    cache = _accumulate_locally(sch, gx, k0, False)
    wg, wo, wk, wn = sch.get_loops(gw)
    wg0, wg1 = sch.split(wg, [blocks, None])
    wc, wr = sch.split(wn, [None, chunk], disable_predication=True)
    wo0, wk0, wo1, wk1 = _weight_grad_register_tile(sch, wo, wk, knobs)
    sch.reorder(wg0, wc, wg1, wo0, wk0, wr, wo1, wk1)
    tops, chunks, groups = [g0, wg0], [c, wc], [g1, wg1]
    if bias:
        gb = sch.get_sblock("grad_bias")
        bg, bo, bn = sch.get_loops(gb)
        bg0, bg1 = sch.split(bg, [blocks, None])
        bc, br = sch.split(bn, [None, chunk], disable_predication=True)
        sch.reorder(bg0, bc, bg1, br, bo)
        tops.append(bg0)
        chunks.append(bc)
        groups.append(bg1)
    _parallel(sch, sch.merge(*tops))
    sch.merge(*chunks)
    sch.merge(*groups)
    sch.unroll(r1)
    sch.vectorize(k1)
    sch.vectorize(sch.get_loops(cache)[-1])
    sch.decompose_reduction(gx, o)
    sch.unroll(wo1)
    sch.vectorize(wk1)
    sch.decompose_reduction(gw, sch.get_loops(gw)[1])  # zeroed once, before the row chunks
    if bias:
        gb = sch.get_sblock("grad_bias")
        loops = sch.get_loops(gb)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(gb, loops[1])
    for block in (gx, gw):
        sch.annotate(block, ROW_TILE_KEY, chunk)
    sch.annotate(gx, STRUCTURE_KEY, knobs.structure)
    for name in loop_roles("grad_input", "last", bias).present_packs(sch):  # a (G, K, O) weight's
        _schedule_pack(sch, name)


def _schedule_backward_one_pass_rows(sch: s_tir.Schedule, bias: bool, knobs: Knobs) -> None:
    """Blocks of rows in parallel, one per thread, as the forward runs; per chunk of a block's
    rows, grad_x walks every group of each row tile (rows read in memory order), then
    grad_weight and grad_bias add the chunk to the thread's own partial sums (``rfactor``),
    which a last step adds up. The kernel needs the row count to be a multiple of
    ``PARALLEL_BLOCKS`` chunks (its row tile)."""
    threads = PARALLEL_BLOCKS
    chunk = knobs.inner_choice(sch, ONE_PASS_CHUNKS, 8)
    gx = sch.get_sblock("grad_x")
    n, g, k, o = sch.get_loops(gx)
    rows, lanes = _default_register_tile(_extent(sch, k))
    row_tile = knobs.inner_choice(sch, ROW_TILES, rows)
    t, c, r = sch.split(n, [threads, None, chunk], disable_predication=True)
    r0, r1 = sch.split(r, [None, row_tile])
    k0, k1 = _split_static(sch, k, knobs, 64, lanes)
    sch.reorder(t, c, r0, g, k0, o, r1, k1)
    cache = _accumulate_locally(sch, gx, k0, False)
    tops, chunks, partials = [t], [c], []
    for name in ("grad_weight", "grad_bias") if bias else ("grad_weight",):
        block = sch.get_sblock(name)
        *_, rows_loop = sch.get_loops(block)
        split, _, _ = sch.split(rows_loop, [threads, None, chunk], disable_predication=True)
        partial = sch.rfactor(split, factor_axis=0)  # (threads, G, O[, K]): a thread's sums
        partials.append((name, partial))
        *spatial, pt, pc, pr = sch.get_loops(partial)  # spatial: g, o[, k]
        if name == "grad_weight":
            wg, wo, wk = spatial
            wo0, wk0, wo1, wk1 = _weight_grad_register_tile(sch, wo, wk, knobs)
            sch.reorder(pt, pc, wg, wo0, wk0, pr, wo1, wk1)
        else:
            bg, bo = spatial
            sch.reorder(pt, pc, bg, pr, bo)
        tops.append(pt)
        chunks.append(pc)
    # Merge puts the joined loop where the last loop it is given was, its bodies in the order
    # given: grad_x's loops (the first at the root) go last, so the joined loop runs before
    # the final sums that read the partial sums.
    _parallel(sch, sch.merge(*tops[1:], tops[0]))
    sch.merge(*chunks[1:], chunks[0])
    sch.unroll(r1)
    sch.vectorize(k1)
    sch.vectorize(sch.get_loops(cache)[-1])
    sch.decompose_reduction(gx, o)
    for name, partial in partials:
        loops = sch.get_loops(partial)
        if name == "grad_weight":
            sch.unroll(loops[-2])
        sch.vectorize(loops[-1])
        sch.decompose_reduction(partial, loops[1])  # zeroed once, before the row chunks
        # The threads' partial sums added up: groups in parallel, the last axis vectorised.
        final = sch.get_sblock(name)
        *spatial, summed = sch.get_loops(final)
        sch.reorder(spatial[0], summed, *spatial[1:])
        _parallel(sch, spatial[0])
        sch.vectorize(spatial[-1])
        sch.decompose_reduction(final, summed)
    for block in (gx, partials[0][1]):
        sch.annotate(block, ROW_TILE_KEY, chunk)  # the sampled chunk (a trace's own variable)
        sch.annotate(block, ROW_TILE_BLOCKS_KEY, threads)
    sch.annotate(gx, STRUCTURE_KEY, knobs.structure)
    for name in loop_roles("grad_input", "last", bias).present_packs(sch):
        _schedule_pack(sch, name)


def _weight_grad_register_tile(sch: s_tir.Schedule, o_loop, k_loop, knobs: Knobs):
    """grad_weight's (o, k) loops split as :func:`_schedule_weight_grad` splits them:
    (o blocks, k blocks, o tile, k lanes)."""
    o_limit, o_default = GRAD_WEIGHT_O_TILE
    if _extent(sch, k_loop) <= GRAD_WEIGHT_ONE_VECTOR:
        o_limit, o_default = GRAD_WEIGHT_O_TILE_ONE_VECTOR
    k0, k1 = _split_static(sch, k_loop, knobs, 64, 64)
    o0, o1 = _split_static(sch, o_loop, knobs, o_limit, o_default)
    return o0, k0, o1, k1


ONE_PASS = {"one_pass_groups": _schedule_backward_one_pass_groups, "one_pass_rows": _schedule_backward_one_pass_rows}
