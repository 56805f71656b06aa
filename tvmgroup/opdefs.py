"""The ops, one descriptor each: TE compute, argument roles, float64 reference, tolerance.

Every op is a per-group contraction; its row count is symbolic (one kernel serves every
batch size) and G, K and O are static (schedules tile them exactly). Everything that
handles an op reads its :class:`OpDef`: the compute definition (:mod:`tvmgroup.compute`),
the kernels' row splitting (:mod:`tvmgroup.kernel`), the first-use check
(:mod:`tvmgroup.check`), the benchmark's and the tests' references. A new op is one
descriptor in :data:`OP_DEFS` plus its schedule in each template.

Argument order of the kernels: forward ``(x, weight[, bias], y)``; grad_input ``(grad_y,
weight, grad_x)``; grad_weight ``(grad_y, x, grad_weight[, grad_bias])``; backward (both
gradient ops in one kernel) ``(grad_y, x, weight, grad_x, grad_weight[, grad_bias])``.
Row-indexed tensors are in the kernel view of the layout (:meth:`~tvmgroup.layouts.Layout.kernel_view`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from tvm import te

from tvmgroup.layouts import Layout
from tvmgroup.weights import as_out_in, weight_shape

if TYPE_CHECKING:
    from tvmgroup.compute import OpSpec

ACCUMULATOR = "float32"  # every sum accumulates in float32, whatever the storage dtype


@dataclass(frozen=True)
class Arg:
    """One kernel argument and the part it plays."""

    name: str
    role: str  # "rows": row-indexed (x, y, grads of them); "weight": as stored; "bias": (G, O)
    output: bool = False
    features: str = ""  # rows role: "in" (K) or "out" (O)
    with_bias_only: bool = False  # present only when the op has a bias

    @property
    def summed_over_rows(self) -> bool:
        """An output that is a sum over all rows (a row split must add its parts)."""
        return self.output and self.role != "rows"

    def shape(self, spec: "OpSpec", layout: Layout, rows: int) -> tuple[int, ...]:
        g, k, o = spec.groups, spec.in_features, spec.out_features
        if self.role == "weight":
            return weight_shape(g, k, o, spec.weight_layout)
        if self.role == "bias":
            return (g, o)
        return tuple(layout.shape(layout.row_dims(rows), g, k if self.features == "in" else o))


@dataclass(frozen=True)
class OpDef:
    """What one op is, for everything that handles it."""

    name: str
    args: tuple[Arg, ...]
    build: Callable  # (spec, layout, row dims) -> TE tensors in argument order
    reference: Callable  # (layout, float64 inputs, with_bias) -> float64 outputs
    depth: Callable  # (spec, rows) -> terms in each output's sum (its rounding-error bound)
    uses_bias: bool = True  # False: the op ignores the bias (one kernel serves both)
    sum_starts_from_bias: bool = False  # float32: the reduction's init reads the bias

    def arg_list(self, bias: bool) -> list[Arg]:
        return [a for a in self.args if bias or not a.with_bias_only]

    def operands(
        self, spec: "OpSpec", layout: Layout, rows: int, dtype: torch.dtype, device: str = "cpu"
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Standard-normal inputs and empty outputs on ``device``; the outputs' indices."""
        tensors, outs = [], []
        for i, arg in enumerate(self.arg_list(spec.bias)):
            shape = arg.shape(spec, layout, rows)
            if arg.output:
                outs.append(i)
                tensors.append(torch.empty(shape, dtype=dtype, device=device))
            else:
                tensors.append(torch.randn(shape).to(device=device, dtype=dtype))
        return tensors, outs

    def reference_outputs(self, spec: "OpSpec", layout: Layout, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs in float64 from the inputs among ``tensors`` (kernel argument order).

        The references take and give ``(G, O, K)`` weights: a weight stored otherwise is
        viewed that way, and a weight output is given back as stored.
        """
        args = self.arg_list(spec.bias)
        inputs = [
            as_out_in(t.double(), spec.weight_layout) if a.role == "weight" else t.double()
            for t, a in zip(tensors, args) if not a.output
        ]
        outputs = self.reference(layout, inputs, spec.bias)
        out_args = [a for a in args if a.output]
        return [as_out_in(t, spec.weight_layout) if a.role == "weight" else t for t, a in zip(outputs, out_args)]


# -- which axis is vectorised where the groups are contiguous ("groups_last") ------------------

GROUP_VECTOR = 8  # groups that are a multiple of this fill whole vectors: lanes across groups
FEATURE_VECTOR = 8  # otherwise features that are a multiple of this are vectorised
GROUPS_PACK = "weight_packed_groups"  # the (R, J, G) weight of ops that vectorise across groups


def vectorises_groups(layout: Layout, groups: int, features: int) -> bool:
    """Whether an op whose output has ``features`` features vectorises across the groups
    (each lane a group, reading x and writing y in place, the weight packed groups
    innermost: ``GROUPS_PACK``) rather than along the features as ``"last"`` does (each
    tile's rows copied features innermost first). Only where the groups are contiguous.

    Across the groups where they fill whole vectors, or where the features would not;
    vectors of other widths compile to element-wise code, many times slower.
    """
    if not layout.groups_innermost:
        return False
    return groups % GROUP_VECTOR == 0 or features % FEATURE_VECTOR != 0


# -- TE helpers --------------------------------------------------------------------------------


def _widen(value):
    return value if value.dtype == ACCUMULATOR else value.astype(ACCUMULATOR)


def _mul(a, b):
    return _widen(a) * _widen(b)


def _stored(acc: te.Tensor, dtype: str) -> te.Tensor:
    """The float32 sum ``acc`` as the op's storage dtype: a cast stage named ``<acc>_out``."""
    if dtype == ACCUMULATOR:
        return acc
    return te.compute(acc.shape, lambda *i: acc(*i).astype(dtype), name=f"{acc.op.name}_out")


def _reduce_axes(dims: Sequence) -> list:
    return [te.reduce_axis((0, d), name=f"r{i}") for i, d in enumerate(dims)]


def _weight(spec: "OpSpec") -> tuple[te.Tensor, Callable]:
    """The weight placeholder as stored, and its element ``(g, o, k)``."""
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    w = te.placeholder(weight_shape(g_, k_, o_, spec.weight_layout), spec.dtype, name="weight")
    if spec.weight_layout == "out_in":
        return w, lambda g, o, k: w[g, o, k]
    return w, lambda g, o, k: w[g, k, o]


# -- forward: y = x @ weight[g].T + bias[g] -------------------------------------------------------


def _forward(spec: "OpSpec", layout: Layout, dims: list):
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    x = te.placeholder(layout.shape(dims, g_, k_), spec.dtype, name="x")
    w, w_elem = _weight(spec)
    k = te.reduce_axis((0, k_), name="k")
    if vectorises_groups(layout, g_, o_):
        # Packed (K, O, G): each vector lane is a group, reading its own weight.
        wt = te.compute((k_, o_, g_), lambda kk, o, g: w_elem(g, o, kk), name=GROUPS_PACK)
        w_at = lambda g, o: wt[k, o, g]  # noqa: E731
    elif not layout.rows_innermost and spec.weight_layout == "out_in":
        # Packed so the innermost (vectorised) output axis reads weight contiguously (a
        # (G, K, O) weight already is).
        wt = te.compute((g_, k_, o_), lambda g, kk, o: w[g, o, kk], name="weight_packed")
        w_at = lambda g, o: wt[g, k, o]  # noqa: E731
    else:
        w_at = lambda g, o: w_elem(g, o, k)  # noqa: E731

    def body(*idx):
        row, g, o = layout.split(idx)
        return te.sum(_mul(x[layout.index(row, g, k)], w_at(g, o)), axis=k)

    y = te.compute(layout.shape(dims, g_, o_), body, name="y")
    args = [x, w]
    if spec.bias:
        bias = te.placeholder((g_, o_), spec.dtype, name="bias")
        args.append(bias)
        if spec.dtype != ACCUMULATOR:
            # Half types: the bias joins in the cast stage, so the sum starts from zero (what
            # tensor-core accumulators start from). float32 starts the sum from the bias.
            def with_bias(*idx):
                _, g, o = layout.split(idx)
                return (y(*idx) + _widen(bias[g, o])).astype(spec.dtype)

            return args + [te.compute(y.shape, with_bias, name="y_out")]
    return args + [_stored(y, spec.dtype)]


def _forward_reference(layout: Layout, inputs, with_bias: bool):
    x, w, *bias = inputs
    y = torch.einsum(f"{layout.einsum('k')},gok->{layout.einsum('o')}", x, w)
    return [y + layout.bias_view(bias[0]) if bias else y]


# -- grad_input: grad_x = grad_y @ weight[g] --------------------------------------------------


def _grad_input(spec: "OpSpec", layout: Layout, dims: list):
    g_, o_ = spec.groups, spec.out_features
    dy = te.placeholder(layout.shape(dims, g_, o_), spec.dtype, name="grad_y")
    w, w_elem = _weight(spec)
    return [dy, w, _grad_x(spec, layout, dims, dy, w_elem)]


def _grad_x(spec: "OpSpec", layout: Layout, dims: list, dy: te.Tensor, w_elem: Callable) -> te.Tensor:
    """grad_x (as stored) from the placeholders ``dy`` and the weight's element ``w_elem``."""
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    o = te.reduce_axis((0, o_), name="o")
    if vectorises_groups(layout, g_, k_):
        # Packed (O, K, G): each vector lane is a group (see _forward).
        wg = te.compute((o_, k_, g_), lambda oo, kk, g: w_elem(g, oo, kk), name=GROUPS_PACK)
        w_elem = lambda g, oo, kk: wg[oo, kk, g]  # noqa: E731
    elif not layout.rows_innermost and spec.weight_layout == "in_out":
        # Packed so the innermost (vectorised) axis, K, reads the weight contiguously.
        wt = te.compute((g_, o_, k_), lambda g, oo, kk: w_elem(g, oo, kk), name="weight_packed")
        w_elem = lambda g, oo, kk: wt[g, oo, kk]  # noqa: E731

    def body(*idx):
        row, g, k = layout.split(idx)
        return te.sum(_mul(dy[layout.index(row, g, o)], w_elem(g, o, k)), axis=o)

    return _stored(te.compute(layout.shape(dims, g_, k_), body, name="grad_x"), spec.dtype)


def _grad_input_reference(layout: Layout, inputs, with_bias: bool):
    dy, w = inputs
    return [torch.einsum(f"{layout.einsum('o')},gok->{layout.einsum('k')}", dy, w)]


# -- grad_weight: grad_weight = sum over rows of grad_y (x) x, grad_bias = sum of grad_y ------


def _grad_weight(spec: "OpSpec", layout: Layout, dims: list):
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    dy = te.placeholder(layout.shape(dims, g_, o_), spec.dtype, name="grad_y")
    x = te.placeholder(layout.shape(dims, g_, k_), spec.dtype, name="x")
    return [dy, x] + _grad_weight_and_bias(spec, layout, dims, dy, x)


def _grad_weight_and_bias(spec: "OpSpec", layout: Layout, dims: list, dy: te.Tensor, x: te.Tensor) -> list:
    """[grad_weight (stored as the weight is), grad_bias if the op has a bias] from ``dy``, ``x``."""
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    r = _reduce_axes(dims)
    row = tuple(r)

    def term(g, o, k):
        return te.sum(_mul(dy[layout.index(row, g, o)], x[layout.index(row, g, k)]), axis=r)

    if spec.weight_layout == "out_in":
        dw = te.compute((g_, o_, k_), term, name="grad_weight")
    else:  # stored as the weight is: (G, K, O)
        dw = te.compute((g_, k_, o_), lambda g, k, o: term(g, o, k), name="grad_weight")
    outs = [_stored(dw, spec.dtype)]
    if spec.bias:
        rb = _reduce_axes(dims)
        rowb = tuple(rb)
        db = te.compute(
            (g_, o_), lambda g, o: te.sum(_widen(dy[layout.index(rowb, g, o)]), axis=rb), name="grad_bias"
        )
        outs.append(_stored(db, spec.dtype))
    return outs


def _grad_weight_reference(layout: Layout, inputs, with_bias: bool):
    dy, x = inputs
    dw = torch.einsum(f"{layout.einsum('o')},{layout.einsum('k')}->gok", dy, x)
    return [dw, torch.einsum(f"{layout.einsum('o')}->go", dy)] if with_bias else [dw]  # (G, O) in any layout


# -- backward: grad_input and grad_weight in one kernel, grad_y read by both ----------------------


def _backward(spec: "OpSpec", layout: Layout, dims: list):
    g_, k_, o_ = spec.groups, spec.in_features, spec.out_features
    dy = te.placeholder(layout.shape(dims, g_, o_), spec.dtype, name="grad_y")
    x = te.placeholder(layout.shape(dims, g_, k_), spec.dtype, name="x")
    w, w_elem = _weight(spec)
    dx = _grad_x(spec, layout, dims, dy, w_elem)
    return [dy, x, w, dx] + _grad_weight_and_bias(spec, layout, dims, dy, x)


def _backward_reference(layout: Layout, inputs, with_bias: bool):
    dy, x, w = inputs
    return _grad_input_reference(layout, [dy, w], False) + _grad_weight_reference(layout, [dy, x], with_bias)


OP_DEFS: dict[str, OpDef] = {
    d.name: d
    for d in (
        OpDef(
            "forward",
            (Arg("x", "rows", features="in"), Arg("weight", "weight"), Arg("bias", "bias", with_bias_only=True),
             Arg("y", "rows", output=True, features="out")),
            _forward, _forward_reference,
            depth=lambda spec, rows: spec.in_features + 1,
            sum_starts_from_bias=True,
        ),
        OpDef(
            "grad_input",
            (Arg("grad_y", "rows", features="out"), Arg("weight", "weight"), Arg("grad_x", "rows", output=True, features="in")),
            _grad_input, _grad_input_reference,
            depth=lambda spec, rows: spec.out_features,
            uses_bias=False,
        ),
        OpDef(
            "grad_weight",
            (Arg("grad_y", "rows", features="out"), Arg("x", "rows", features="in"), Arg("grad_weight", "weight", output=True),
             Arg("grad_bias", "bias", output=True, with_bias_only=True)),
            _grad_weight, _grad_weight_reference,
            depth=lambda spec, rows: rows,
        ),
        OpDef(
            "backward",
            (Arg("grad_y", "rows", features="out"), Arg("x", "rows", features="in"), Arg("weight", "weight"),
             Arg("grad_x", "rows", output=True, features="in"), Arg("grad_weight", "weight", output=True),
             Arg("grad_bias", "bias", output=True, with_bias_only=True)),
            _backward, _backward_reference,
            # One bound for every output: grad_x sums O terms, grad_weight and grad_bias the rows.
            depth=lambda spec, rows: max(spec.out_features, rows),
        ),
    )
}


def op_def(name: str) -> OpDef:
    """The registered op called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return OP_DEFS[name]
    except (KeyError, TypeError):
        raise ValueError(f"op must be one of {tuple(OP_DEFS)}, got {name!r}") from None


def reference_pass(
    layout: Layout, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad_y: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """A forward and backward pass in float64 on user-layout tensors, from the ops' references.

    ``weight`` is ``(G, O, K)`` (see :func:`tvmgroup.weights.as_out_in`). Returns ``y`` and
    ``grad_x`` in the user's layout, ``grad_weight`` ``(G, O, K)`` and
    ``grad_bias`` ``(G, O)`` (None without a bias). What the benchmark and the tests check
    every formulation against.
    """
    groups, out_features, in_features = weight.shape
    x64 = layout.kernel_view(x.detach().double(), groups, in_features)
    dy64 = layout.kernel_view(grad_y.detach().double(), groups, out_features)
    w64 = weight.detach().double()
    with_bias = bias is not None
    inputs = [x64, w64] + ([bias.detach().double()] if with_bias else [])
    (y,) = OP_DEFS["forward"].reference(layout, inputs, with_bias)
    (dx,) = OP_DEFS["grad_input"].reference(layout, [dy64, w64], False)
    dw, *db = OP_DEFS["grad_weight"].reference(layout, [dy64, x64], with_bias)
    return {
        "y": y.reshape(layout.out_shape(x, groups, out_features)),
        "grad_x": dx.reshape(x.shape),
        "grad_weight": dw,
        "grad_bias": db[0] if with_bias else None,
    }
