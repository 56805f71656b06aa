"""``GroupedLinear`` under ``torch.func.functional_call`` and ``stack_module_state`` + ``vmap``
(ensembles of layers), values and gradients against float64 per-member references, over
every layout and both weight conventions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from tvmgroup import GroupedLinear

G, K, O, MEMBERS = 3, 4, 5, 4  # 60 weights per member: members' slices are not 64-byte aligned
# (layout, weight_layout): every layout, and the (G, K, O) weight of ensemble code.
CASES = [("last", "out_in"), ("conv", "out_in"), ("ensemble", "in_out"), ("shared", "in_out"), ("last", "in_out"),
         ("groups_last", "out_in"), ("heads", "out_in"), ("shared_last", "in_out")]
CASE_IDS = [f"{layout}-{weight_layout}" for layout, weight_layout in CASES]


def _x_shape(layout: str, in_features: int) -> tuple[int, ...]:
    """An input of the first layer (``in_features`` per group)."""
    return {
        "last": (6, G * in_features), "conv": (2, G * in_features, 5), "ensemble": (G, 6, in_features),
        "shared": (6, in_features), "groups_last": (6, in_features, G), "heads": (6, G, in_features),
        "shared_last": (6, in_features),
    }[layout]


def _linear64(x, weight, bias, layout, weight_layout="out_in"):
    w = weight if weight_layout == "out_in" else weight.transpose(1, 2)  # (G, O, K)
    g, o, k = w.shape
    if layout == "groups_last":
        return torch.einsum("nkg,gok->nog", x, w) + bias.t()
    if layout == "heads":
        return torch.einsum("...gk,gok->...go", x, w) + bias
    if layout == "shared_last":
        return (torch.einsum("...k,gok->...go", x, w) + bias).flatten(-2)
    if layout == "last":
        y = torch.einsum("ngk,gok->ngo", x.reshape(-1, g, k), w) + bias
        return y.reshape(*x.shape[:-1], g * o)
    if layout == "conv":
        y = torch.einsum("bgkl,gok->bgol", x.reshape(x.shape[0], g, k, -1), w) + bias[None, :, :, None]
        return y.reshape(x.shape[0], g * o, x.shape[-1])
    if layout == "shared":
        x = x.expand(g, *x.shape)
    y = torch.einsum("gnk,gok->gno", x.reshape(g, -1, k), w) + bias[:, None, :]
    return y.reshape(g, *x.shape[1:-1], o)


def _close(got, want, tol=1e-4, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.detach().double() - want).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), f"{what}: error {err:.3e}"


class _Block(nn.Module):
    """Two grouped layers with a nonlinearity: an ensemble member with more than one layer.
    With ``layout="shared"`` the first layer reads one input for every group and the second
    its ``(G, ..., O)`` output in the ensemble layout."""

    def __init__(self, layout: str, weight_layout: str = "out_in") -> None:
        super().__init__()
        self.first = GroupedLinear(G, K, O, layout=layout, weight_layout=weight_layout)
        self.second = GroupedLinear(G, O, K, layout=_second_layout(layout), weight_layout=weight_layout)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _second_layout(layout: str) -> str:
    return {"shared": "ensemble", "shared_last": "last"}.get(layout, layout)


def _block64(params: dict, x, layout, weight_layout="out_in"):
    p = {k: v.double() for k, v in params.items()}
    h = torch.tanh(_linear64(x.double(), p["first.weight"], p["first.bias"], layout, weight_layout))
    return _linear64(h, p["second.weight"], p["second.bias"], _second_layout(layout), weight_layout)


@pytest.mark.parametrize(("layout", "weight_layout"), CASES, ids=CASE_IDS)
def test_functional_call_uses_the_given_parameters(layout, weight_layout):
    block = _Block(layout, weight_layout)
    params = {k: torch.randn_like(v) for k, v in block.named_parameters()}
    x = torch.randn(_x_shape(layout, K))
    _close(functional_call(block, params, (x,)), _block64(params, x, layout, weight_layout))
    leaves = {k: v.requires_grad_() for k, v in params.items()}
    functional_call(block, leaves, (x,)).pow(2).sum().backward()
    p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    _block64(p64, x, layout, weight_layout).pow(2).sum().backward()
    for k in params:
        _close(leaves[k].grad, p64[k].grad, what=k)
    assert all(p.grad is None for p in block.parameters())  # the module's own were not used


def _ensemble(layout, weight_layout="out_in"):
    members = [_Block(layout, weight_layout) for _ in range(MEMBERS)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    return members, params, buffers, base


@pytest.mark.parametrize(("layout", "weight_layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shared_input", [True, False], ids=["shared", "per_member"])
def test_vmap_over_stacked_modules(layout, weight_layout, shared_input):
    members, params, buffers, base = _ensemble(layout, weight_layout)
    shape = _x_shape(layout, K)
    x = torch.randn(shape) if shared_input else torch.randn(MEMBERS, *shape)

    def member(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    out = vmap(member, in_dims=(0, 0, None if shared_input else 0))(params, buffers, x)
    assert out.shape[0] == MEMBERS  # each member's shape is checked against its reference
    for i, module in enumerate(members):
        xi = x if shared_input else x[i]
        want = _block64(dict(module.named_parameters()), xi, layout, weight_layout)
        _close(out[i], want, what=f"member {i}")
        _close(module(xi), want, what=f"member {i}, eager module")

    # gradients reach the stacked leaves, member by member
    out.pow(2).sum().backward()
    for i, module in enumerate(members):
        xi = x if shared_input else x[i]
        p64 = {k: v.detach().double().requires_grad_() for k, v in module.named_parameters()}
        _block64(p64, xi, layout, weight_layout).pow(2).sum().backward()
        for k in p64:
            _close(params[k].grad[i], p64[k].grad, what=f"member {i} {k}")


@pytest.mark.parametrize(("layout", "weight_layout"), CASES, ids=CASE_IDS)
def test_func_grad_of_vmapped_ensemble(layout, weight_layout):
    """torch.func.grad of a loss over all members (vmap inside grad)."""
    members, params, buffers, base = _ensemble(layout, weight_layout)
    params = {k: v.detach() for k, v in params.items()}
    x = torch.randn(_x_shape(layout, K))

    def loss(p, f):
        return f(p).tanh().sum()

    got = grad(loss)(params, lambda p: vmap(lambda pi: functional_call(base, (pi, buffers), (x,)))(p))
    p64 = {k: v.double() for k, v in params.items()}
    want = grad(loss)(p64, lambda p: vmap(lambda pi: _block64(pi, x, layout, weight_layout))(p))
    for k in params:
        _close(got[k], want[k], what=k)


@pytest.mark.parametrize(("layout", "weight_layout"), [("last", "out_in"), ("shared", "in_out")],
                         ids=["last-out_in", "shared-in_out"])
def test_vmapped_ensemble_with_gradients_of_gradients(layout, weight_layout):
    """Per-member input gradients made under vmap, then differentiated into the stacked
    parameters (the ensemble-critic diversity pattern, written with torch.func)."""
    members, params, buffers, base = _ensemble(layout, weight_layout)
    params = {k: v.detach() for k, v in params.items()}
    x = torch.randn(_x_shape(layout, K))

    def loss(p, f, x):
        gx = vmap(lambda pi: grad(lambda xi: f(pi, xi).sum())(x))(p)  # (members, *x.shape)
        q = vmap(lambda pi: f(pi, x).sum())(p)
        return (gx - gx.mean(0)).pow(2).sum() + q.sum()

    got = grad(loss)(params, lambda pi, xi: functional_call(base, (pi, buffers), (xi,)), x)
    p64 = {k: v.double() for k, v in params.items()}
    want = grad(loss)(p64, lambda pi, xi: _block64(pi, xi, layout, weight_layout), x.double())
    for k in params:
        assert want[k].abs().max() > 0
        _close(got[k], want[k], what=k)
