"""GroupedLinear: initialisation like nn.Linear, and the Conv1d / Linear-list converters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tvmgroup import GroupedLinear


def test_init_matches_nn_linear_statistics():
    g, k, o = 8, 64, 64
    layer = GroupedLinear(g, k, o)
    bound = 1.0 / math.sqrt(k)
    w, b = layer.weight.detach(), layer.bias.detach()
    assert w.shape == (g, o, k) and b.shape == (g, o)
    assert w.abs().max() <= bound and b.abs().max() <= bound
    # Uniform on [-bound, bound]: std bound/sqrt(3), mean 0, and each group reaches the bound.
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(w.mean().item()) < 0.02 * bound
    assert b.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    for group in w:
        assert group.abs().max() > 0.95 * bound
    assert not torch.equal(w[0], w[1]), "groups must be initialised independently"


def test_init_without_bias_and_with_dtype():
    layer = GroupedLinear(2, 9, 3, bias=False, dtype=torch.float64)
    assert layer.bias is None and layer.weight.dtype == torch.float64
    assert layer.weight.abs().max() <= 1 / 3


def test_module_forward_and_repr(ref_grads, close):
    layer = GroupedLinear(3, 5, 4, layout="conv")
    x = torch.randn(2, 15, 13)
    y = layer(x)
    close(y, *ref_grads(x, layer.weight, layer.bias, torch.randn_like(y), "conv")["y"], what="layer")
    assert "groups=3, in_features=5, out_features=4, bias=True, layout='conv'" in repr(layer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 0}, "groups must be a positive int, got 0"),
        ({"in_features": -1}, "in_features must be a positive int, got -1"),
        ({"out_features": 2.0}, "out_features must be a positive int, got 2.0"),
        ({"groups": True}, "groups must be a positive int, got True"),
        ({"layout": "nlc"}, r"layout must be one of \('last', 'conv'\), got 'nlc'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = {"groups": 3, "in_features": 5, "out_features": 4} | kwargs
    layout = args.pop("layout", "last")
    with pytest.raises(ValueError, match=match):
        GroupedLinear(**args, layout=layout)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_conv1d_matches_the_conv(bias, ref_grads, close):
    conv = nn.Conv1d(3 * 5, 3 * 4, kernel_size=1, groups=3, bias=bias)
    layer = GroupedLinear.from_conv1d(conv)
    assert layer.layout == "conv" and (layer.bias is not None) == bias
    x = torch.randn(2, 15, 13)
    with torch.no_grad():
        y, y_conv = layer(x), conv(x)
    expect = ref_grads(x, layer.weight, layer.bias, torch.randn_like(y), "conv")["y"]
    close(y, *expect, what="from_conv1d")
    close(y_conv, *expect, what="nn.Conv1d itself")
    # No shared storage: changing the layer leaves the conv alone.
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(conv.weight.reshape(layer.weight.shape), layer.weight)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_to_conv1d_round_trips(bias):
    layer = GroupedLinear(3, 5, 4, bias=bias)
    conv = layer.to_conv1d()
    assert (conv.in_channels, conv.out_channels, conv.groups, conv.kernel_size) == (15, 12, 3, (1,))
    back = GroupedLinear.from_conv1d(conv)
    assert torch.equal(back.weight, layer.weight)
    if bias:
        assert torch.equal(back.bias, layer.bias)
    else:
        assert conv.bias is None and back.bias is None
    x = torch.randn(2, 15, 13)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), back(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_linears_matches_the_module_list(bias, ref_grads, close):
    linears = nn.ModuleList(nn.Linear(5, 4, bias=bias) for _ in range(3))
    layer = GroupedLinear.from_linears(linears)
    assert layer.layout == "last"
    x = torch.randn(2, 7, 15)
    with torch.no_grad():
        y = layer(x)
        y_loop = torch.cat([lin(x[..., 5 * i : 5 * (i + 1)]) for i, lin in enumerate(linears)], dim=-1)
    expect = ref_grads(x, layer.weight, layer.bias, torch.randn_like(y), "last")["y"]
    close(y, *expect, what="from_linears")
    close(y_loop, *expect, what="the ModuleList loop")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_size": 2}, r"kernel_size=1, got kernel_size=\(2,\)"),
        ({"stride": 2}, r"stride=1, got stride=\(2,\)"),
        ({"padding": 1}, r"padding=0, got padding=\(1,\)"),
        ({"dilation": 2}, r"dilation=1, got dilation=\(2,\)"),
        ({"padding": "same", "kernel_size": 1}, r"padding=0, got padding='same'"),
    ],
)
def test_from_conv1d_rejects_what_is_not_a_grouped_linear(kwargs, match):
    conv = nn.Conv1d(6, 6, **({"kernel_size": 1} | kwargs), groups=2)
    with pytest.raises(ValueError, match=match):
        GroupedLinear.from_conv1d(conv)


def test_from_conv1d_rejects_other_modules():
    with pytest.raises(TypeError, match="expects an nn.Conv1d, got Linear"):
        GroupedLinear.from_conv1d(nn.Linear(3, 3))


def test_from_linears_errors():
    with pytest.raises(ValueError, match="at least one nn.Linear, got none"):
        GroupedLinear.from_linears([])
    with pytest.raises(ValueError, match=r"item 1 has \(5, 3, True\)"):
        GroupedLinear.from_linears([nn.Linear(5, 4), nn.Linear(5, 3)])
    with pytest.raises(ValueError, match=r"= \(5, 4, True\); item 1 has \(5, 4, False\)"):
        GroupedLinear.from_linears([nn.Linear(5, 4), nn.Linear(5, 4, bias=False)])
    with pytest.raises(TypeError, match="item 1 is Conv1d"):
        GroupedLinear.from_linears([nn.Linear(5, 4), nn.Conv1d(5, 4, 1)])


def test_layer_trains(ref_grads, close):
    """Gradients reach the parameters through the module and an optimizer step changes them."""
    layer = GroupedLinear(3, 5, 4)
    x = torch.randn(13, 15)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expect = ref_grads(x, layer.weight, layer.bias, grad_y, "last")
    close(layer.weight.grad, *expect["weight"], what="weight.grad")
    close(layer.bias.grad, *expect["bias"], what="bias.grad")
    before = layer.weight.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert not torch.equal(before, layer.weight)
