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


@pytest.mark.parametrize("weight_layout, bias_layout", [("out_in", "grouped"), ("in_out", "broadcast"), ("in_out", "flat")])
def test_groups_last_layer_trains_like_per_channel_linears(weight_layout, bias_layout, ref_grads, close):
    """A head per channel of a (B, L, C) series, y (B, P, C): outputs and every gradient."""
    from tvmgroup.weights import as_out_in

    c, length, p = 7, 24, 8
    layer = GroupedLinear(c, length, p, layout="groups_last", weight_layout=weight_layout, bias_layout=bias_layout)
    assert "layout='groups_last'" in repr(layer)
    x = torch.randn(5, length, c, requires_grad=True)
    y = layer(x)
    assert y.shape == (5, p, c)
    grad_y = torch.randn_like(y)
    weight = as_out_in(layer.weight.detach(), weight_layout)
    want = ref_grads(x.detach(), weight, layer.bias.detach().reshape(c, p), grad_y, "groups_last")
    close(y, *want["y"], what="y")
    y.backward(grad_y)
    close(x.grad, *want["x"], what="grad_x")
    value, mag, depth = want["weight"]
    close(layer.weight.grad, as_out_in(value, weight_layout), as_out_in(mag, weight_layout), depth, what="grad_weight")
    value, mag, depth = want["bias"]
    shape = layer.bias.shape
    close(layer.bias.grad, value.reshape(shape), mag.reshape(shape), depth, what="grad_bias")
    with pytest.raises(ValueError, match=r"layout='groups_last' expects x of shape \(\.\.\., in_features, groups\) = \(\.\.\., 24, 7\), got x of shape \(5, 7, 24\)"):
        layer(torch.randn(5, c, length))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 0}, "groups must be a positive int, got 0"),
        ({"in_features": -1}, "in_features must be a positive int, got -1"),
        ({"out_features": 2.0}, "out_features must be a positive int, got 2.0"),
        ({"groups": True}, "groups must be a positive int, got True"),
        ({"layout": "nlc"}, r"layout must be one of \('last', 'conv', 'ensemble', 'groups_last', 'heads', 'shared', 'shared_last'\), got 'nlc'"),
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


# ---------------------------------------------------------------------------------------------
# parameters kept in a given convention, and checkpoints


class _Ensemble(nn.Module):
    """How RL ensembles store a linear layer: weight (E, in, out), bias (E, 1, out)."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(members, in_features, out_features))
        self.bias = nn.Parameter(torch.randn(members, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, B, in) -> (E, B, out)
        return torch.baddbmm(self.bias, x, self.weight)


def test_ensemble_checkpoint_loads_into_a_layer_of_its_convention(ref_grads, close):
    ensemble = _Ensemble(4, 6, 6)  # square: only the convention tells weight from its transpose
    layer = GroupedLinear(4, 6, 6, weight_layout="in_out", bias_layout="broadcast")
    layer.load_state_dict(ensemble.state_dict())
    assert layer.weight.shape == (4, 6, 6) and layer.bias.shape == (4, 1, 6)
    assert torch.equal(layer.weight, ensemble.weight) and torch.equal(layer.bias, ensemble.bias)
    x = torch.randn(4, 9, 6)  # (E, B, in)
    with torch.no_grad():
        want = ensemble(x)
        got_last = layer(x.transpose(0, 1).reshape(9, 24)).reshape(9, 4, 6).transpose(0, 1)
        layer.layout = "ensemble"
        got = layer(x)
    torch.testing.assert_close(got_last, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == set(ensemble.state_dict())
    assert "weight_layout='in_out', bias_layout='broadcast'" in repr(layer)


@pytest.mark.parametrize("bias_shape", [(3, 1, 4), (3, 4), None])
def test_from_ensemble_keeps_the_convention(bias_shape, ref_grads, close):
    weight = torch.randn(3, 5, 4)
    bias = torch.randn(bias_shape) if bias_shape else None
    layer = GroupedLinear.from_ensemble(weight, bias)
    assert layer.weight_layout == "in_out" and layer.weight.shape == (3, 5, 4) and layer.layout == "ensemble"
    assert (layer.bias is None) if bias is None else (layer.bias.shape == bias.shape)
    assert layer.weight.data_ptr() != weight.data_ptr()
    x = torch.randn(3, 13, 5)
    y = layer(x)
    bias_go = bias.reshape(3, 4) if bias is not None else None
    grad_y = torch.randn_like(y)
    expect = ref_grads(x, weight.transpose(1, 2), bias_go, grad_y, "ensemble")
    close(y, *expect["y"], what="from_ensemble")
    y.backward(grad_y)
    value, mag, depth = expect["weight"]
    close(layer.weight.grad, value.transpose(1, 2), mag.transpose(1, 2), depth, what="grad_weight")
    if bias is not None:
        value, mag, depth = expect["bias"]
        close(layer.bias.grad, value.reshape(bias_shape), mag.reshape(bias_shape), depth, what="grad_bias")


def test_from_ensemble_errors():
    with pytest.raises(ValueError, match=r"weight_layout='in_out' takes a weight of shape \(groups, in_features, out_features\)"):
        GroupedLinear.from_ensemble(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"bias must have shape .* = \(3, 1, 4\) .* got \(3, 5\)"):
        GroupedLinear.from_ensemble(torch.randn(3, 5, 4), torch.randn(3, 5))


def test_in_out_layer_initialises_like_nn_linear():
    layer = GroupedLinear(4, 256, 16, weight_layout="in_out")
    bound = 1.0 / math.sqrt(256)  # fan-in is in_features, whatever the storage
    assert layer.weight.shape == (4, 256, 16)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
    assert layer.bias.shape == (4, 16) and layer.bias.abs().max() <= bound


def test_in_out_layer_to_conv1d():
    layer = GroupedLinear(3, 5, 4, weight_layout="in_out", bias_layout="flat", layout="last")
    conv = layer.to_conv1d()
    x = torch.randn(13, 15)
    with torch.no_grad():
        want = conv(x[:, :, None])[:, :, 0]
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def _snapshot(layer: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize(
    "change, strict, match",
    [
        ({"extra": torch.zeros(1)}, True, r'Unexpected key\(s\) in state_dict: "extra"'),
        ({"bias": None}, True, r'Missing key\(s\) in state_dict: "bias"'),
        ({"bias": torch.randn(3, 4)}, True, r"size mismatch for bias: the checkpoint has \(3, 4\), this GroupedLinear keeps "
                                            r"\(3, 1, 4\) \(bias_layout='broadcast'\); build the layer with bias_layout='grouped'"),
        ({"bias": torch.randn(3, 4)}, False, r"size mismatch for bias"),
    ],
)
def test_a_failed_load_changes_nothing(change, strict, match):
    """Square weights: the weight of the checkpoint fits, yet nothing may be copied."""
    layer = GroupedLinear(3, 4, 4, weight_layout="in_out", bias_layout="broadcast")
    before = _snapshot(layer)
    state = {"weight": torch.randn(3, 4, 4), "bias": torch.randn(3, 1, 4)} | change
    state = {k: v for k, v in state.items() if v is not None}
    with pytest.raises(RuntimeError, match=match):
        layer.load_state_dict(state, strict=strict)
    for key, value in _snapshot(layer).items():
        assert torch.equal(value, before[key]), f"{key} changed although the load failed"


def test_loading_the_other_weight_convention_names_the_fix():
    layer = GroupedLinear(3, 5, 4)  # out_in: (3, 4, 5)
    with pytest.raises(RuntimeError, match=r"the checkpoint has \(3, 5, 4\), this GroupedLinear keeps \(3, 4, 5\) "
                                           r"\(weight_layout='out_in': .*\); build the layer with weight_layout='in_out'"):
        layer.load_state_dict({"weight": torch.randn(3, 5, 4), "bias": torch.randn(3, 4)})


def test_non_strict_load_of_present_keys_still_works():
    layer = GroupedLinear(3, 5, 4)
    weight = torch.randn(3, 4, 5)
    result = layer.load_state_dict({"weight": weight}, strict=False)
    assert result.missing_keys == ["bias"]
    assert torch.equal(layer.weight, weight)


def test_a_shape_error_inside_a_model_copies_none_of_the_layer():
    model = nn.Sequential(GroupedLinear(3, 4, 4, weight_layout="in_out"))
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0.bias"):
        model.load_state_dict({"0.weight": torch.randn(3, 4, 4), "0.bias": torch.randn(3, 1, 4)})
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight_layout": "oi"}, r"weight_layout must be one of 'out_in' .*'in_out' .*; got 'oi'"),
        ({"bias_layout": "row"}, r"bias_layout must be one of 'grouped' .*'broadcast' .*'flat' .*; got 'row'"),
    ],
)
def test_constructor_rejects_unknown_conventions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupedLinear(3, 5, 4, **kwargs)
