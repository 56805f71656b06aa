"""The TE computes: OpSpec checks, argument order, and the unscheduled ops' numerics."""

from __future__ import annotations

import pytest
import torch
import tvm

from tvmgroup.compute import LAYOUTS, OPS, OpSpec, ir_module, prim_func
from tvmgroup.target import cpu_target

G, K, O = 3, 5, 4


def test_opspec_key_names_everything():
    spec = OpSpec("grad_weight", 3, 5, 4, layout="conv", bias=False)
    assert spec.key == "grad_weight-conv-g3-k5-o4-float32-nobias"
    keys = {OpSpec(op, 3, 5, 4, layout=lay, bias=b).key for op in OPS for lay in LAYOUTS for b in (True, False)}
    # grad_input does not depend on the bias: one spec (and one kernel) for both.
    assert len(keys) == (len(OPS) - 1) * len(LAYOUTS) * 2 + len(LAYOUTS)


def test_grad_input_spec_ignores_bias():
    assert OpSpec("grad_input", 3, 5, 4, bias=True) == OpSpec("grad_input", 3, 5, 4, bias=False)
    assert OpSpec("grad_input", 3, 5, 4, bias=True).key.endswith("-nobias")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"op": "grad_bias"}, r"op must be one of \('forward', 'grad_input', 'grad_weight', 'backward'\), got 'grad_bias'"),
        ({"layout": "nlc"}, r"layout must be one of \('last', 'conv', 'ensemble', 'groups_last', 'heads'\), got 'nlc'"),
        ({"groups": 0}, "groups must be a positive int, got 0"),
        ({"in_features": 2.5}, "in_features must be a positive int, got 2.5"),
        ({"out_features": -3}, "out_features must be a positive int, got -3"),
    ],
)
def test_opspec_rejects_bad_fields(kwargs, match):
    fields = {"op": "forward", "groups": G, "in_features": K, "out_features": O} | kwargs
    with pytest.raises(ValueError, match=match):
        OpSpec(**fields)


@pytest.mark.parametrize(
    "op, bias, names",
    [
        ("forward", True, ["x", "weight", "bias", "y"]),
        ("forward", False, ["x", "weight", "y"]),
        ("grad_input", True, ["grad_y", "weight", "grad_x"]),
        ("grad_weight", True, ["grad_y", "x", "grad_weight", "grad_bias"]),
        ("grad_weight", False, ["grad_y", "x", "grad_weight"]),
        ("backward", True, ["grad_y", "x", "weight", "grad_x", "grad_weight", "grad_bias"]),
        ("backward", False, ["grad_y", "x", "weight", "grad_x", "grad_weight"]),
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_argument_order(op, bias, names, layout):
    func = prim_func(OpSpec(op, G, K, O, layout=layout, bias=bias))
    assert [p.name for p in func.params] == names
    assert func.attrs["global_symbol"] == "main"


def test_fixed_rows_remove_the_symbolic_dims():
    symbolic = prim_func(OpSpec("forward", G, K, O, layout="last")).script()
    fixed = prim_func(OpSpec("forward", G, K, O, layout="last"), rows=16).script()
    assert '"n"' in symbolic and "(16, 3, 5)" in fixed and '"n"' not in fixed
    conv = prim_func(OpSpec("forward", G, K, O, layout="conv"), rows=16).script()
    assert "(1, 3, 5, 16)" in conv
    assert set(ir_module(OpSpec("forward", G, K, O)).functions.keys()).pop().name_hint == "main"


def test_forward_reduction_starts_from_the_bias():
    script = prim_func(OpSpec("forward", G, K, O, layout="last", bias=True)).script()
    init = script.split("T.init()")[1].split("\n")[1]
    assert "bias[" in init, init


def _unscheduled(spec: OpSpec):
    return tvm.compile(ir_module(spec), target=cpu_target())


def _as_kernel_layout(t: torch.Tensor, layout: str, features: int) -> torch.Tensor:
    from tvmgroup.layouts import layout_of

    view = layout_of(layout).kernel_view(t, G, features)
    assert view.data_ptr() == t.data_ptr()
    return view


_USER_SHAPES = {  # (x, y) in each layout's user shape
    "last": ((13, G * K), (13, G * O)),
    "conv": ((2, G * K, 7), (2, G * O, 7)),
    "ensemble": ((G, 13, K), (G, 13, O)),
    "groups_last": ((13, K, G), (13, O, G)),
    "heads": ((13, G, K), (13, G, O)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unscheduled_computes_match_float64(layout, ref_grads, close):
    """The computes alone, without any schedule, define the right op (symbolic rows)."""
    shape, y_shape = _USER_SHAPES[layout]
    x, weight, bias = torch.randn(shape), torch.randn(G, O, K), torch.randn(G, O)
    grad_y = torch.randn(y_shape)
    expect = ref_grads(x, weight, bias, grad_y, layout)

    y = torch.full(y_shape, float("nan"))
    _unscheduled(OpSpec("forward", G, K, O, layout=layout))(
        _as_kernel_layout(x, layout, K), weight, bias, _as_kernel_layout(y, layout, O)
    )
    close(y, *expect["y"], what="forward")

    grad_x = torch.full(shape, float("nan"))
    _unscheduled(OpSpec("grad_input", G, K, O, layout=layout, bias=False))(
        _as_kernel_layout(grad_y, layout, O), weight, _as_kernel_layout(grad_x, layout, K)
    )
    close(grad_x, *expect["x"], what="grad_input")

    grad_w, grad_b = torch.full((G, O, K), float("nan")), torch.full((G, O), float("nan"))
    _unscheduled(OpSpec("grad_weight", G, K, O, layout=layout))(
        _as_kernel_layout(grad_y, layout, O), _as_kernel_layout(x, layout, K), grad_w, grad_b
    )
    close(grad_w, *expect["weight"], what="grad_weight")
    close(grad_b, *expect["bias"], what="grad_bias")
