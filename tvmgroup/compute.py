"""An op's kernel specification (:class:`OpSpec`) and its TIR PrimFunc.

The compute definitions themselves live with their ops (:mod:`tvmgroup.opdefs`), written
against a :class:`~tvmgroup.layouts.Layout`. The row count (all batch-like axes) is symbolic,
so one compiled kernel serves every batch size; G, K and O are static.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tvm
from tvm import s_tir, te, tirx

from tvmgroup.layouts import LAYOUTS as _LAYOUT_REGISTRY
from tvmgroup.layouts import Layout, layout_of
from tvmgroup.opdefs import ACCUMULATOR, OP_DEFS, OpDef, op_def
from tvmgroup.weights import check_weight_layout

LAYOUTS: tuple[str, ...] = tuple(_LAYOUT_REGISTRY)  # layout names
OPS: tuple[str, ...] = tuple(OP_DEFS)  # op names


@dataclass(frozen=True)
class OpSpec:
    """Everything that determines one compiled kernel, apart from the target."""

    op: str
    groups: int
    in_features: int
    out_features: int
    dtype: str = "float32"
    layout: str = "last"
    bias: bool = True
    weight_layout: str = "out_in"  # how the weight is stored: see tvmgroup.weights

    def __post_init__(self) -> None:
        op_def(self.op)  # ValueErrors naming the choices
        layout_of(self.layout)
        check_weight_layout(self.weight_layout)
        for name in ("groups", "in_features", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.bias and not OP_DEFS[self.op].uses_bias:
            # e.g. grad_input never sees the bias: one kernel (and one tuning log) serves both.
            object.__setattr__(self, "bias", False)

    @property
    def op_def(self) -> OpDef:
        return OP_DEFS[self.op]

    @property
    def layout_def(self) -> Layout:
        return _LAYOUT_REGISTRY[self.layout]

    @property
    def key(self) -> str:
        """A file-name-safe name of this spec, used by caches and tuning logs."""
        b = "bias" if self.bias else "nobias"
        # The default weight convention adds nothing: existing keys (logs, caches) stay.
        w = "" if self.weight_layout == "out_in" else f"-weight_{self.weight_layout}"
        return (
            f"{self.op}-{self.layout}-g{self.groups}-k{self.in_features}"
            f"-o{self.out_features}-{self.dtype}-{b}{w}"
        )


def _set_reduction_init(stmt, block_name: str, make_init: Callable):
    """Returns ``stmt`` with the init of block ``block_name`` replaced by ``make_init(block)``.

    ``te.create_prim_func`` always initialises a reduction with the reducer's identity; the
    float32 forward pass starts its sum from the bias instead, so the bias costs no extra
    pass over y.
    """
    if isinstance(stmt, tirx.For):
        return tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind,
            _set_reduction_init(stmt.body, block_name, make_init),
            stmt.thread_binding, stmt.annotations,
        )
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_set_reduction_init(s, block_name, make_init) for s in stmt.seq])
    if isinstance(stmt, s_tir.SBlockRealize):
        return s_tir.SBlockRealize(
            stmt.iter_values, stmt.predicate, _set_reduction_init(stmt.block, block_name, make_init)
        )
    if isinstance(stmt, s_tir.SBlock):
        init = make_init(stmt) if stmt.name_hint == block_name else stmt.init
        return s_tir.SBlock(
            stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint,
            _set_reduction_init(stmt.body, block_name, make_init),
            init, stmt.alloc_buffers, stmt.match_buffers, stmt.annotations,
        )
    return stmt


def _bias_init(func: tirx.PrimFunc, layout: Layout) -> tirx.PrimFunc:
    bias = func.params[2]

    def make_init(block):
        # Spatial block vars follow the output's axes: (n, g, o), (b, g, o, l) or (g, n, o).
        acc = block.writes[0].source
        idx = [iv.var for iv in block.iter_vars][: len(acc.shape)]
        _, g, o = layout.split(idx)
        value = tirx.BufferLoad(bias, [g, o])
        if bias.dtype != acc.dtype:
            value = tirx.Cast(acc.dtype, value)
        return tirx.BufferStore(acc, value, idx)

    return func.with_body(_set_reduction_init(func.body, "y", make_init))


def prim_func(spec: OpSpec, rows: int | None = None) -> tirx.PrimFunc:
    """The op as a TIR PrimFunc; ``rows`` fixes the row count (used when tuning), else symbolic.

    Its arguments are in the order of the op's :class:`~tvmgroup.opdefs.OpDef` ``args``.
    """
    layout = spec.layout_def
    tensors = spec.op_def.build(spec, layout, layout.row_dims(rows))
    func = te.create_prim_func(tensors)
    if spec.op_def.sum_starts_from_bias and spec.bias and spec.dtype == ACCUMULATOR:
        func = _bias_init(func, layout)
    if rows is None:
        func = _with_layout_strides(func, spec, layout)
    return func.with_attr("global_symbol", "main")


def _with_layout_strides(func: tirx.PrimFunc, spec: OpSpec, layout: Layout) -> tirx.PrimFunc:
    """Row-indexed buffers declared with the layout's strides (symbolic ones are bound from
    the tensors at each call), so the kernel reads strided views in place. Compute as
    before; a layout without strides (``"last"``, ``"conv"``) keeps compact buffers.

    Only for symbolic rows: tuning measures compact buffers, whose schedule decisions
    replay here unchanged.
    """
    replace = {}
    for param, arg in zip(func.params, spec.op_def.arg_list(spec.bias)):
        if arg.role != "rows":
            continue
        strides = layout.buffer_strides(arg.name, list(param.ty.shape), output=arg.output)
        if strides is not None:
            replace[param] = tirx.decl_buffer(param.ty.shape, param.ty.dtype, param.name, strides=strides)
    if not replace:
        return func
    from tvm.tirx.transform.common import BufferReplacer

    return BufferReplacer(replace)(func)


def ir_module(spec: OpSpec, rows: int | None = None) -> tvm.IRModule:
    return tvm.IRModule({"main": prim_func(spec, rows)})
