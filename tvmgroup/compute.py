"""TE compute definitions of the grouped linear op and its two backward passes.

Every op is a per-group contraction. The row count (all leading dims of the user's
tensor, flattened) is symbolic, so one compiled kernel serves every batch size; G, K and O
are static so schedules can tile them exactly.

Two memory layouts are supported, and the kernels index the user's tensors in place:

* ``"last"``: x is ``(N, G, K)`` (a view of ``(..., G*K)``), y is ``(N, G, O)``.
* ``"conv"``: x is ``(B, G, K, L)`` (a view of Conv1d's ``(B, G*K, L)``), y ``(B, G, O, L)``.
  Both B and L are symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import tvm
from tvm import s_tir, te, tirx

Layout = Literal["last", "conv"]
OpName = Literal["forward", "grad_input", "grad_weight"]

LAYOUTS: tuple[str, ...] = ("last", "conv")
OPS: tuple[str, ...] = ("forward", "grad_input", "grad_weight")


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

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("groups", "in_features", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.op == "grad_input" and self.bias:
            # grad_input never sees the bias: one kernel (and one tuning log) serves both.
            object.__setattr__(self, "bias", False)

    @property
    def key(self) -> str:
        """A file-name-safe name of this spec, used by caches and tuning logs."""
        b = "bias" if self.bias else "nobias"
        return (
            f"{self.op}-{self.layout}-g{self.groups}-k{self.in_features}"
            f"-o{self.out_features}-{self.dtype}-{b}"
        )


ACCUMULATOR = "float32"  # every sum accumulates in float32, whatever the storage dtype


def _widen(value):
    return value if value.dtype == ACCUMULATOR else value.astype(ACCUMULATOR)


def _mul(a, b):
    return _widen(a) * _widen(b)


def _stored(acc: te.Tensor, dtype: str) -> te.Tensor:
    """The float32 sum ``acc`` as the op's storage dtype: a cast stage named ``<acc>_out``."""
    if dtype == ACCUMULATOR:
        return acc
    return te.compute(acc.shape, lambda *i: acc(*i).astype(dtype), name=f"{acc.op.name}_out")


class _Rows:
    """Maps a row (the flattened leading dims) and a feature index to tensor indices."""

    def __init__(self, layout: str, rows: int | None = None) -> None:
        self.layout = layout
        if layout == "last":
            self.dims = [te.var("n") if rows is None else rows]
        else:
            self.dims = [te.var("b"), te.var("l")] if rows is None else [1, rows]

    def shape(self, groups: int, features: int) -> list:
        if self.layout == "last":
            return [self.dims[0], groups, features]
        return [self.dims[0], groups, features, self.dims[1]]

    def index(self, row: tuple, g, f) -> tuple:
        if self.layout == "last":
            return (row[0], g, f)
        return (row[0], g, f, row[1])

    def split(self, idx: tuple) -> tuple[tuple, object, object]:
        """Splits output indices into (row, group, feature)."""
        if self.layout == "last":
            return (idx[0],), idx[1], idx[2]
        return (idx[0], idx[3]), idx[1], idx[2]

    def reduce_axes(self) -> list:
        return [te.reduce_axis((0, d), name=f"r{i}") for i, d in enumerate(self.dims)]


def _forward(spec: OpSpec, rows: _Rows):
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    x = te.placeholder(rows.shape(g_, k_), spec.dtype, name="x")
    w = te.placeholder((g_, o_, k_), spec.dtype, name="weight")
    k = te.reduce_axis((0, k_), name="k")
    if rows.layout == "last":
        # Packed so the innermost (vectorised) output axis reads weight contiguously.
        wt = te.compute((g_, k_, o_), lambda g, kk, o: w[g, o, kk], name="weight_packed")

        def body(*idx):
            row, g, o = rows.split(idx)
            return te.sum(_mul(x[rows.index(row, g, k)], wt[g, k, o]), axis=k)
    else:

        def body(*idx):
            row, g, o = rows.split(idx)
            return te.sum(_mul(x[rows.index(row, g, k)], w[g, o, k]), axis=k)

    y = te.compute(rows.shape(g_, o_), body, name="y")
    args = [x, w]
    if spec.bias:
        bias = te.placeholder((g_, o_), spec.dtype, name="bias")
        args.append(bias)
        if spec.dtype != ACCUMULATOR:
            # Half types: the bias joins in the cast stage, so the sum starts from zero (what
            # tensor-core accumulators start from). float32 starts the sum from the bias.
            def with_bias(*idx):
                _, g, o = rows.split(idx)
                return (y(*idx) + _widen(bias[g, o])).astype(spec.dtype)

            return args + [te.compute(y.shape, with_bias, name="y_out")]
    return args + [_stored(y, spec.dtype)]


def _grad_input(spec: OpSpec, rows: _Rows):
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    dy = te.placeholder(rows.shape(g_, o_), spec.dtype, name="grad_y")
    w = te.placeholder((g_, o_, k_), spec.dtype, name="weight")
    o = te.reduce_axis((0, o_), name="o")

    def body(*idx):
        row, g, k = rows.split(idx)
        return te.sum(_mul(dy[rows.index(row, g, o)], w[g, o, k]), axis=o)

    dx = _stored(te.compute(rows.shape(g_, k_), body, name="grad_x"), spec.dtype)
    return [dy, w, dx]


def _grad_weight(spec: OpSpec, rows: _Rows):
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    dy = te.placeholder(rows.shape(g_, o_), spec.dtype, name="grad_y")
    x = te.placeholder(rows.shape(g_, k_), spec.dtype, name="x")
    r = rows.reduce_axes()
    row = tuple(r)
    dw = te.compute(
        (g_, o_, k_),
        lambda g, o, k: te.sum(_mul(dy[rows.index(row, g, o)], x[rows.index(row, g, k)]), axis=r),
        name="grad_weight",
    )
    outs = [_stored(dw, spec.dtype)]
    if spec.bias:
        rb = rows.reduce_axes()
        rowb = tuple(rb)
        db = te.compute(
            (g_, o_), lambda g, o: te.sum(_widen(dy[rows.index(rowb, g, o)]), axis=rb), name="grad_bias"
        )
        outs.append(_stored(db, spec.dtype))
    return [dy, x] + outs


_BUILDERS: dict[str, Callable] = {
    "forward": _forward,
    "grad_input": _grad_input,
    "grad_weight": _grad_weight,
}


def _set_reduction_init(stmt, block_name: str, make_init: Callable):
    """Returns ``stmt`` with the init of block ``block_name`` replaced by ``make_init(block)``.

    ``te.create_prim_func`` always initialises a reduction with the reducer's identity; the
    forward pass starts its sum from the bias instead, so the bias costs no extra pass over y.
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


def _bias_init(func: tirx.PrimFunc) -> tirx.PrimFunc:
    bias = func.params[2]

    def make_init(block):
        # Spatial block vars follow the output's axes: (n, g, o) or (b, g, o, l).
        acc = block.writes[0].source
        idx = [iv.var for iv in block.iter_vars][: len(acc.shape)]
        value = tirx.BufferLoad(bias, [idx[1], idx[2]])
        if bias.dtype != acc.dtype:
            value = tirx.Cast(acc.dtype, value)
        return tirx.BufferStore(acc, value, idx)

    return func.with_body(_set_reduction_init(func.body, "y", make_init))


def prim_func(spec: OpSpec, rows: int | None = None) -> tirx.PrimFunc:
    """The op as a TIR PrimFunc; ``rows`` fixes the row count (used when tuning), else symbolic.

    Argument order: forward ``(x, weight[, bias], y)``; grad_input ``(grad_y, weight, grad_x)``;
    grad_weight ``(grad_y, x, grad_weight[, grad_bias])``.
    """
    tensors = _BUILDERS[spec.op](spec, _Rows(spec.layout, rows))
    func = te.create_prim_func(tensors)
    if spec.op == "forward" and spec.bias and spec.dtype == ACCUMULATOR:
        func = _bias_init(func)
    return func.with_attr("global_symbol", "main")


def ir_module(spec: OpSpec, rows: int | None = None) -> tvm.IRModule:
    return tvm.IRModule({"main": prim_func(spec, rows)})
