"""Op descriptors: argument roles, operands, and references that agree with autograd."""

from __future__ import annotations

import pytest
import torch

from tvmgroup.compute import OpSpec, prim_func
from tvmgroup.layouts import LAYOUTS, layout_of
from tvmgroup.opdefs import OP_DEFS, op_def, reference_pass


def test_unknown_op_names_the_choices():
    with pytest.raises(ValueError, match=r"op must be one of \('forward', 'grad_input', 'grad_weight', 'backward'\)"):
        op_def("grad_bias")


@pytest.mark.parametrize("name", list(OP_DEFS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_arguments_match_the_prim_func(name, layout, bias):
    """Roles, order and shapes of the descriptor's arguments are those of the compute."""
    spec = OpSpec(name, 3, 5, 4, layout=layout, bias=bias)
    func = prim_func(spec, rows=8)
    args = spec.op_def.arg_list(spec.bias)
    assert [p.name for p in func.params] == [a.name for a in args]
    tensors, outs = spec.op_def.operands(spec, spec.layout_def, 8, torch.float32)
    assert outs == [i for i, a in enumerate(args) if a.output]
    assert [[int(d) for d in p.shape] for p in func.params] == [list(t.shape) for t in tensors]


def test_grad_input_ignores_the_bias():
    assert OpSpec("grad_input", 2, 3, 4, bias=True).bias is False


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_reference_pass_agrees_with_autograd(layout, bias):
    """The three ops' references are the forward and the exact gradients of the forward."""
    lay = layout_of(layout)
    shape = {"last": (6, 2 * 3), "conv": (2, 2 * 3, 5), "ensemble": (2, 6, 3), "groups_last": (6, 3, 2), "heads": (6, 2, 3)}[layout]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True) if bias else None
    grad_y = torch.randn(lay.out_shape(x, 2, 4), dtype=torch.float64)
    got = reference_pass(lay, x, w, b, grad_y)
    xs = lay.kernel_view(x, 2, 3)
    y = torch.einsum(f"{lay.einsum('k')},gok->{lay.einsum('o')}", xs, w)
    if b is not None:
        y = y + lay.bias_view(b)
    y = y.reshape(lay.out_shape(x, 2, 4))
    y.backward(grad_y)
    torch.testing.assert_close(got["y"], y.detach())
    torch.testing.assert_close(got["grad_x"], x.grad)
    torch.testing.assert_close(got["grad_weight"], w.grad)
    if bias:
        torch.testing.assert_close(got["grad_bias"], b.grad)
    else:
        assert got["grad_bias"] is None


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
def test_backward_reference_is_grad_input_and_grad_weight(layout, bias, weight_layout):
    """The fused backward's outputs are grad_input's and grad_weight's, from one set of inputs."""
    spec = OpSpec("backward", 3, 5, 4, layout=layout, bias=bias, weight_layout=weight_layout)
    lay = spec.layout_def
    tensors, outs = spec.op_def.operands(spec, lay, 7, torch.float32)
    assert outs == [3, 4, 5] if bias else [3, 4]
    grad_y, x, weight = tensors[:3]
    fused = spec.op_def.reference_outputs(spec, lay, tensors)
    gi = OpSpec("grad_input", 3, 5, 4, layout=layout, weight_layout=weight_layout)
    gw = OpSpec("grad_weight", 3, 5, 4, layout=layout, bias=bias, weight_layout=weight_layout)
    separate = gi.op_def.reference_outputs(gi, lay, [grad_y, weight, None])
    separate += gw.op_def.reference_outputs(gw, lay, [grad_y, x] + [None] * (len(outs) - 1))
    assert len(fused) == len(separate) == len(outs)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b)
    assert spec.op_def.depth(spec, 7) == 7 and spec.op_def.depth(spec, 2) == 4
