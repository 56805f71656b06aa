"""Property: for random small shapes, layouts, weight and bias conventions, forward and all
gradients match float64. Few examples, since every new shape compiles its kernels (~1 s)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvmgroup import grouped_linear
from tvmgroup.weights import as_out_in, bias_shape, weight_shape


def _small(dims: list[int]) -> bool:
    return len(dims) < 3 or dims[0] * dims[1] * dims[2] <= 200


@st.composite
def cases(draw):
    groups = draw(st.integers(1, 6))
    in_features = draw(st.integers(1, 20))
    out_features = draw(st.integers(1, 20))
    layout = draw(st.sampled_from(["last", "conv", "ensemble", "groups_last"]))
    bias = draw(st.sampled_from([None, "grouped", "broadcast", "flat"]))
    weight_layout = draw(st.sampled_from(["out_in", "in_out"]))
    if layout == "last":
        lead = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3).filter(_small))
        x_shape = (*lead, groups * in_features)
    elif layout == "groups_last":
        lead = draw(st.lists(st.integers(1, 40), min_size=1, max_size=2).filter(_small))
        x_shape = (*lead, in_features, groups)
    elif layout == "ensemble":
        lead = draw(st.lists(st.integers(1, 40), min_size=1, max_size=2).filter(_small))
        x_shape = (groups, *lead, in_features)
    else:
        x_shape = (draw(st.integers(1, 3)), groups * in_features, draw(st.integers(1, 70)))
    seed = draw(st.integers(0, 2**31 - 1))
    return groups, in_features, out_features, layout, bias, weight_layout, x_shape, seed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_matches_float64(case, ref_grads, close):
    # The fixtures are stateless helper functions: sharing them across examples is safe.
    groups, in_features, out_features, layout, bias, weight_layout, x_shape, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen, requires_grad=True)
    shape = weight_shape(groups, in_features, out_features, weight_layout)
    weight = torch.randn(shape, generator=gen, requires_grad=True)
    b = torch.randn(bias_shape(groups, out_features, bias), generator=gen, requires_grad=True) if bias else None
    y = grouped_linear(x, weight, b, layout=layout, weight_layout=weight_layout)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    b_go = b.detach().reshape(groups, out_features) if bias else None
    expect = ref_grads(x, as_out_in(weight.detach(), weight_layout), b_go, grad_y, layout)
    close(y, *expect["y"], what="y")
    close(x.grad, *expect["x"], what="grad_x")
    value, mag, depth = expect["weight"]
    close(weight.grad, as_out_in(value, weight_layout), as_out_in(mag, weight_layout), depth, what="grad_weight")
    if bias:
        value, mag, depth = expect["bias"]
        close(b.grad, value.reshape(b.shape), mag.reshape(b.shape), depth, what="grad_bias")
