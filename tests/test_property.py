"""Property: for random small shapes, layouts and bias, forward and all gradients match
float64. Few examples, since every new shape compiles its kernels (~1 s)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvmgroup import grouped_linear


def _small(dims: list[int]) -> bool:
    return len(dims) < 3 or dims[0] * dims[1] * dims[2] <= 200


@st.composite
def cases(draw):
    groups = draw(st.integers(1, 6))
    in_features = draw(st.integers(1, 20))
    out_features = draw(st.integers(1, 20))
    layout = draw(st.sampled_from(["last", "conv"]))
    bias = draw(st.booleans())
    if layout == "last":
        lead = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3).filter(_small))
        x_shape = (*lead, groups * in_features)
    else:
        x_shape = (draw(st.integers(1, 3)), groups * in_features, draw(st.integers(1, 70)))
    seed = draw(st.integers(0, 2**31 - 1))
    return groups, in_features, out_features, layout, bias, x_shape, seed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_matches_float64(case, ref_grads, close):
    # The fixtures are stateless helper functions: sharing them across examples is safe.
    groups, in_features, out_features, layout, bias, x_shape, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen, requires_grad=True)
    weight = torch.randn(groups, out_features, in_features, generator=gen, requires_grad=True)
    b = torch.randn(groups, out_features, generator=gen, requires_grad=True) if bias else None
    y = grouped_linear(x, weight, b, layout=layout)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    expect = ref_grads(x, weight, b, grad_y, layout)
    close(y, *expect["y"], what="y")
    close(x.grad, *expect["x"], what="grad_x")
    close(weight.grad, *expect["weight"], what="grad_weight")
    if bias:
        close(b.grad, *expect["bias"], what="grad_bias")
