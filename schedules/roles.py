"""Which loop of each op's main block plays which part in a GEMM-like schedule.

Every op is a per-group contraction whose last output axis is contiguous in memory (the
axis to vectorise) and has one more axis worth register-blocking (the "row" axis, whose
operand is broadcast). Schedules look these up instead of hard-coding loop positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir

from tvmgroup.layouts import layout_of
from tvmgroup.opdefs import GROUPS_PACK

# Block annotation: the tile a kernel's symbolic extent (rows, or L in the conv layout) must be
# a multiple of; other extents run through the tail build or a padded copy.
ROW_TILE_KEY = "tvmgroup.row_tile"
# Block annotation beside ROW_TILE_KEY: the row tile is that many rows times this (an integer):
# a structure that gives each of several parallel blocks a sampled chunk of rows.
ROW_TILE_BLOCKS_KEY = "tvmgroup.row_tile_blocks"
# Block annotation: which of the template's loop structures for the op a schedule has (an index
# into the template's structures, see ``knobs.Knobs.structure``); absent means the first.
STRUCTURE_KEY = "tvmgroup.structure"


@dataclass(frozen=True)
class LoopRoles:
    block: str  # the main reduction block
    n_spatial: int  # spatial loops come first, then the reduction loops
    row: int  # index of the register-blocked spatial loop
    vector_symbolic: bool  # whether the vector (last spatial) loop is symbolic
    extra_blocks: tuple[str, ...] = ()  # reductions computed beside the main one
    packs: tuple[str, ...] = ()  # layout copies of the (small) weight the op may have

    def present_packs(self, sch: s_tir.Schedule) -> list[str]:
        """The pack stages this op's PrimFunc has: which one (if any) depends on how the
        weight is stored (forward packs a (G, O, K) weight, grad_input a (G, K, O) one).

        Read from the IR, not through schedule instructions: a trace must hold only the
        instructions the templates' allow-list names (``knobs.py``)."""
        names: set[str] = set()
        tvm_ffi.structural_walk(sch.mod["main"].body, (s_tir.SBlock, lambda b: names.add(b.name_hint)))
        return [name for name in self.packs if name in names]


# Ops made of other ops' computations in one PrimFunc: each part keeps its blocks' names and is
# scheduled as that op is (the fused backward: grad_x, then grad_weight and grad_bias).
PARTS: dict[str, tuple[str, ...]] = {"backward": ("grad_input", "grad_weight")}


def op_parts(op: str) -> tuple[str, ...]:
    """The single ops whose computations make up ``op`` (``(op,)`` for a single op)."""
    return PARTS.get(op, (op,))


def loop_roles(op: str, layout: str, bias: bool = True) -> LoopRoles:
    lay = layout_of(layout)
    last = not lay.rows_innermost
    # Features innermost: the register-blocked loop is the row axis (its position in the
    # output's axes); rows innermost (conv): the output features.
    row = lay.row_axis if last else 2
    # The weight copied for contiguous vector reads; "groups_last" may pack it groups innermost.
    packs = ("weight_packed", *((GROUPS_PACK,) if lay.groups_innermost else ())) if last else ()
    if op == "forward":
        return LoopRoles("y", 3 if last else 4, row, not last, packs=packs)
    if op == "grad_input":
        return LoopRoles("grad_x", 3 if last else 4, row, not last, packs=packs)
    if op == "grad_weight":
        return LoopRoles("grad_weight", 3, 1, False, ("grad_bias",) if bias else ())
    raise ValueError(f"unknown op {op!r}")


def row_tile_of(mod: tvm.IRModule) -> int:
    """The row tile a scheduled module requires: the largest ``ROW_TILE_KEY`` on its blocks
    (times the block's ``ROW_TILE_BLOCKS_KEY``, where it has one)."""
    sch = s_tir.Schedule(mod)
    tiles = [1]
    pending = sch.get_child_blocks(sch.get_sblock("root"))
    while pending:
        block = pending.pop()
        annotations = sch.get(block).annotations
        value = annotations.get(ROW_TILE_KEY)
        if value is not None:
            tiles.append(int(value) * int(annotations.get(ROW_TILE_BLOCKS_KEY, 1)))
        pending.extend(sch.get_child_blocks(block))
    return max(tiles)
