"""``GroupedLinear`` under ``torch.func.functional_call`` and ``stack_module_state`` + ``vmap``
(ensembles of layers), values and gradients against float64 per-member references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from tvmgroup import GroupedLinear

G, K, O, MEMBERS = 3, 4, 5, 4  # 60 weights per member: members' slices are not 64-byte aligned
LAYOUTS = ["last", "conv", "groups_last"]


def _x_shape(layout: str, features: int) -> tuple[int, ...]:
    """x of ``features`` = G * F features in all (its groups first for "groups_last")."""
    return {"last": (6, features), "conv": (2, features, 5), "groups_last": (6, features // G, G)}[layout]


def _linear64(x, weight, bias, layout):
    g, o, k = weight.shape
    if layout == "groups_last":
        return torch.einsum("nkg,gok->nog", x, weight) + bias.t()
    if layout == "last":
        y = torch.einsum("ngk,gok->ngo", x.reshape(-1, g, k), weight) + bias
        return y.reshape(*x.shape[:-1], g * o)
    y = torch.einsum("bgkl,gok->bgol", x.reshape(x.shape[0], g, k, -1), weight) + bias[None, :, :, None]
    return y.reshape(x.shape[0], g * o, x.shape[-1])


def _close(got, want, tol=1e-4, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.detach().double() - want).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), f"{what}: error {err:.3e}"


class _Block(nn.Module):
    """Two grouped layers with a nonlinearity: an ensemble member with more than one layer."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.first = GroupedLinear(G, K, O, layout=layout)
        self.second = GroupedLinear(G, O, K, layout=layout)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _block64(params: dict, x, layout):
    p = {k: v.double() for k, v in params.items()}
    h = torch.tanh(_linear64(x.double(), p["first.weight"], p["first.bias"], layout))
    return _linear64(h, p["second.weight"], p["second.bias"], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_functional_call_uses_the_given_parameters(layout):
    block = _Block(layout)
    params = {k: torch.randn_like(v) for k, v in block.named_parameters()}
    x = torch.randn(_x_shape(layout, G * K))
    _close(functional_call(block, params, (x,)), _block64(params, x, layout))
    leaves = {k: v.requires_grad_() for k, v in params.items()}
    functional_call(block, leaves, (x,)).pow(2).sum().backward()
    p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    _block64(p64, x, layout).pow(2).sum().backward()
    for k in params:
        _close(leaves[k].grad, p64[k].grad, what=k)
    assert all(p.grad is None for p in block.parameters())  # the module's own were not used


def _ensemble(layout):
    members = [_Block(layout) for _ in range(MEMBERS)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    return members, params, buffers, base


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shared_input", [True, False], ids=["shared", "per_member"])
def test_vmap_over_stacked_modules(layout, shared_input):
    members, params, buffers, base = _ensemble(layout)
    shape = _x_shape(layout, G * K)
    x = torch.randn(shape) if shared_input else torch.randn(MEMBERS, *shape)

    def member(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    out = vmap(member, in_dims=(0, 0, None if shared_input else 0))(params, buffers, x)
    assert out.shape == (MEMBERS, *shape)
    for i, module in enumerate(members):
        xi = x if shared_input else x[i]
        want = _block64(dict(module.named_parameters()), xi, layout)
        _close(out[i], want, what=f"member {i}")
        _close(module(xi), want, what=f"member {i}, eager module")

    # gradients reach the stacked leaves, member by member
    out.pow(2).sum().backward()
    for i, module in enumerate(members):
        xi = x if shared_input else x[i]
        p64 = {k: v.detach().double().requires_grad_() for k, v in module.named_parameters()}
        _block64(p64, xi, layout).pow(2).sum().backward()
        for k in p64:
            _close(params[k].grad[i], p64[k].grad, what=f"member {i} {k}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_func_grad_of_vmapped_ensemble(layout):
    """torch.func.grad of a loss over all members (vmap inside grad)."""
    members, params, buffers, base = _ensemble(layout)
    params = {k: v.detach() for k, v in params.items()}
    x = torch.randn(_x_shape(layout, G * K))

    def loss(p, f):
        return f(p).tanh().sum()

    got = grad(loss)(params, lambda p: vmap(lambda pi: functional_call(base, (pi, buffers), (x,)))(p))
    p64 = {k: v.double() for k, v in params.items()}
    want = grad(loss)(p64, lambda p: vmap(lambda pi: _block64(pi, x, layout))(p))
    for k in params:
        _close(got[k], want[k], what=k)


def test_vmapped_ensemble_with_gradients_of_gradients():
    """Per-member input gradients made under vmap, then differentiated into the stacked
    parameters (the ensemble-critic diversity pattern, written with torch.func)."""
    members, params, buffers, base = _ensemble("last")
    params = {k: v.detach() for k, v in params.items()}
    x = torch.randn(_x_shape("last", G * K))

    def loss(p, f, x):
        gx = vmap(lambda pi: grad(lambda xi: f(pi, xi).sum())(x))(p)  # (members, *x.shape)
        q = vmap(lambda pi: f(pi, x).sum())(p)
        return (gx - gx.mean(0)).pow(2).sum() + q.sum()

    got = grad(loss)(params, lambda pi, xi: functional_call(base, (pi, buffers), (xi,)), x)
    p64 = {k: v.double() for k, v in params.items()}
    want = grad(loss)(p64, lambda pi, xi: _block64(pi, xi, "last"), x.double())
    for k in params:
        assert want[k].abs().max() > 0
        _close(got[k], want[k], what=k)
