"""Weights and biases read as they are stored: (G, K, O) weights, (G, 1, O) and (G*O,) biases.

Every output and gradient is checked against the float64 reference of the (G, O, K) op on
the same values; gradients come back in the parameters' own shapes.
"""

from __future__ import annotations

import pytest
import torch

from tvmgroup import grouped_linear
from tvmgroup.compute import OpSpec, prim_func
from tvmgroup.ops import grad_input_op, grad_weight_op, grouped_linear_op
from tvmgroup.weights import as_out_in, bias_as_grouped, bias_shape, weight_dims, weight_shape

SHAPES = [(3, 5, 4), (4, 6, 6), (2, 20, 36), (2, 128, 144)]  # the last reads panels (K, O >= 128)
SHAPE_IDS = ["g3k5o4", "square", "g2k20o36", "panels"]


def _x(layout: str, g: int, k: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, g * k) if layout == "last" else torch.randn(2, g * k, rows)


def _check(x, weight, bias, layout, weight_layout, ref_grads, close) -> None:
    g, k, o = weight_dims(weight.shape, weight_layout)
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_()
    y = grouped_linear(x, weight, bias, layout=layout, weight_layout=weight_layout)
    grad_y = torch.randn_like(y)
    bias_go = bias.detach().reshape(g, o) if bias is not None else None
    expect = ref_grads(x, as_out_in(weight.detach(), weight_layout), bias_go, grad_y, layout)
    close(y, *expect["y"], what="y")
    y.backward(grad_y)
    close(x.grad, *expect["x"], what="grad_x")
    assert weight.grad.shape == weight.shape
    value, mag, depth = expect["weight"]
    close(weight.grad, as_out_in(value, weight_layout), as_out_in(mag, weight_layout), depth, what="grad_weight")
    if bias is not None:
        assert bias.grad.shape == bias.shape
        value, mag, depth = expect["bias"]
        close(bias.grad, value.reshape(bias.shape), mag.reshape(bias.shape), depth, what="grad_bias")


# Each bias layout with one shape (the bias's layout does not change the kernel).
CASES = list(zip(SHAPES, ["broadcast", "flat", "grouped", "broadcast"])) + [(SHAPES[0], None)]


@pytest.mark.parametrize("layout", ["last", "conv"])
@pytest.mark.parametrize("shape, bias_layout", CASES, ids=[f"{i}-{b}" for i, (_, b) in zip(SHAPE_IDS + ["nobias"], CASES)])
def test_in_out_weight_matches_float64(shape, layout, bias_layout, ref_grads, close):
    g, k, o = shape
    for rows in (1, 13, 64):
        weight = torch.randn(g, k, o)
        bias = torch.randn(bias_shape(g, o, bias_layout)) if bias_layout else None
        _check(_x(layout, g, k, rows), weight, bias, layout, "in_out", ref_grads, close)


@pytest.mark.parametrize("bias_layout", ["broadcast", "flat"])
@pytest.mark.parametrize("layout", ["last", "conv"])
def test_out_in_weight_takes_every_bias_shape(layout, bias_layout, ref_grads, close):
    g, k, o = 3, 5, 4
    bias = torch.randn(bias_shape(g, o, bias_layout))
    _check(_x(layout, g, k, 13), torch.randn(g, o, k), bias, layout, "out_in", ref_grads, close)


def test_in_out_is_not_the_transpose_of_out_in():
    """A square (G, K, K) weight computes x @ W (in_out), not x @ W^T (out_in)."""
    g, k = 2, 6
    x, w = torch.randn(9, g * k), torch.randn(g, k, k)
    want = torch.einsum("ngk,gko->ngo", x.double().view(9, g, k), w.double()).reshape(9, g * k)
    got = grouped_linear(x, w, weight_layout="in_out")
    assert (got.double() - want).abs().max() < 1e-4
    assert (grouped_linear(x, w).double() - want).abs().max() > 1e-2


def test_bias_views_share_memory():
    g, o = 3, 4
    for layout in ("grouped", "broadcast", "flat"):
        bias = torch.randn(bias_shape(g, o, layout))
        view = bias_as_grouped(bias, g, o)
        assert view.shape == (g, o) and view.data_ptr() == bias.data_ptr()


def test_shapes_and_dims_round_trip():
    for wl in ("out_in", "in_out"):
        assert weight_dims(weight_shape(3, 5, 4, wl), wl) == (3, 5, 4)
    assert weight_shape(3, 5, 4, "in_out") == (3, 5, 4) and weight_shape(3, 5, 4, "out_in") == (3, 4, 5)


def test_in_out_kernels_read_the_weight_as_stored():
    """No pack stage where the stored weight already has the vectorised axis contiguous."""
    g, k, o = 3, 5, 4
    forward = prim_func(OpSpec("forward", g, k, o, weight_layout="in_out")).script()
    assert "weight_packed" not in forward and f"weight: T.Buffer(({g}, {k}, {o})" in forward
    grad_input = prim_func(OpSpec("grad_input", g, k, o, weight_layout="in_out")).script()
    assert "weight_packed" in grad_input  # K is vectorised there: the (G, K, O) weight is transposed
    grad_weight = prim_func(OpSpec("grad_weight", g, k, o, weight_layout="in_out")).script()
    assert f"grad_weight: T.Buffer(({g}, {k}, {o})" in grad_weight
    assert OpSpec("forward", g, k, o, weight_layout="in_out").key.endswith("-bias-weight_in_out")
    assert OpSpec("forward", g, k, o).key.endswith("-bias")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight_layout": "kio"}, r"weight_layout must be one of 'out_in' \(groups, out_features, in_features\), "
                                    r"'in_out' \(groups, in_features, out_features\); got 'kio'"),
        ({"bias": torch.randn(3, 5)}, r"bias must have shape \(groups, out_features\) = \(3, 4\) or"),
    ],
)
def test_clear_errors(kwargs, match):
    args = {"weight_layout": "in_out", "bias": None} | kwargs
    with pytest.raises(ValueError, match=match):
        grouped_linear(torch.randn(7, 15), torch.randn(3, 5, 4), args["bias"], weight_layout=args["weight_layout"])
    with pytest.raises(ValueError, match=r"weight_layout must be one of"):
        OpSpec("forward", 3, 5, 4, weight_layout="io")


def test_in_out_x_of_the_wrong_width_names_in_features():
    with pytest.raises(ValueError, match=r"groups\*in_features = 3\*5 = 15, got x of shape \(7, 12\) \(weight \(3, 5, 4\) "
                                         r"read as weight_layout='out_in' \(groups, out_features, in_features\) would fit\)"):
        grouped_linear(torch.randn(7, 12), torch.randn(3, 5, 4), weight_layout="in_out")
    with pytest.raises(ValueError, match=r"in_features=4\), got x of shape \(3, 9, 5\) \(weight \(3, 5, 4\) read as weight_layout='in_out'"):
        grouped_linear(torch.randn(3, 9, 5), torch.randn(3, 5, 4), layout="ensemble")  # an (E, in, out) weight
    with pytest.raises(ValueError, match=r"= 15, got x of shape \(7, 16\)$"):
        grouped_linear(torch.randn(7, 16), torch.randn(3, 5, 4), weight_layout="in_out")  # fits neither: no note


# -- custom ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["last", "conv"])
@pytest.mark.parametrize("bias_layout", ["broadcast", None])
def test_opcheck_in_out(layout, bias_layout):
    g, k, o = 3, 5, 4
    x = _x(layout, g, k, 13).requires_grad_()
    weight = torch.randn(g, k, o, requires_grad=True)
    bias = torch.randn(bias_shape(g, o, bias_layout), requires_grad=True) if bias_layout else None
    torch.library.opcheck(grouped_linear_op, (x, weight, bias, layout, "in_out"), raise_exception=True)
    grad_y = torch.randn(13, g * o) if layout == "last" else torch.randn(2, g * o, 13)
    torch.library.opcheck(grad_input_op, (grad_y, weight.detach(), layout, "in_out"), raise_exception=True)
    torch.library.opcheck(
        grad_weight_op, (grad_y, x.detach(), weight.detach(), True, layout, "in_out"), raise_exception=True
    )


def test_torch_compile_fullgraph_in_out():
    torch._dynamo.reset()
    g, k, o = 3, 5, 4
    weight = torch.randn(g, k, o, requires_grad=True)
    bias = torch.randn(g, 1, o, requires_grad=True)

    def f(x):
        return torch.tanh(grouped_linear(x * 2.0, weight, bias, weight_layout="in_out")).sum(dim=-1)

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(13, g * k)
    results = []
    for fn in (f, compiled):
        weight.grad = bias.grad = None
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.sum().backward()
        results.append((out.detach(), xi.grad, weight.grad, bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["last", "conv"])
def test_cuda_in_out_weight_matches_float64(layout, ref_grads, close):
    g, k, o = 3, 5, 4
    x = _x(layout, g, k, 97).cuda().requires_grad_()
    weight = torch.randn(g, k, o, device="cuda", requires_grad=True)
    bias = torch.randn(g, 1, o, device="cuda", requires_grad=True)
    y = grouped_linear(x, weight, bias, layout=layout, weight_layout="in_out")
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.cuda.synchronize()
    expect = ref_grads(x.cpu(), weight.detach().cpu().transpose(1, 2), bias.detach().cpu().reshape(g, o), grad_y.cpu(), layout)
    close(y.cpu(), *expect["y"], what="cuda y")
    close(x.grad.cpu(), *expect["x"], what="cuda grad_x")
    value, mag, depth = expect["weight"]
    close(weight.grad.cpu(), value.transpose(1, 2), mag.transpose(1, 2), depth, what="cuda grad_weight")
    value, mag, depth = expect["bias"]
    close(bias.grad.cpu(), value.reshape(g, 1, o), mag.reshape(g, 1, o), depth, what="cuda grad_bias")
