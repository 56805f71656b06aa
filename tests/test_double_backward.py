"""Gradients of gradients: the backward ops are differentiable again, in the eager path
(``EagerGroupedLinear`` and its backward Functions) and through the registered ops.

Every result is checked against the same computation written with plain torch ops in float64
(``_linear64``), on random inputs with K != O so a transposed weight cannot pass.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp

from tvmgroup import grouped_linear
from tvmgroup.ops import grad_input_op, grad_weight_op, grouped_linear_op

G, K, O = 3, 4, 5
LAYOUTS = ["last", "conv"]


def _x_shape(layout: str) -> tuple[int, ...]:
    return (7, G * K) if layout == "last" else (2, G * K, 6)


def _linear64(x, weight, bias, layout="last"):
    """The op with differentiable torch ops (einsum), for the float64 side of each check."""
    g, o, k = weight.shape
    if layout == "last":
        y = torch.einsum("...gk,gok->...go", x.reshape(*x.shape[:-1], g, k), weight)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], g * o)
    y = torch.einsum("bgkl,gok->bgol", x.reshape(x.shape[0], g, k, x.shape[-1]), weight)
    if bias is not None:
        y = y + bias[None, :, :, None]
    return y.reshape(x.shape[0], g * o, x.shape[-1])


def _tvmgroup(x, weight, bias, layout="last"):
    return grouped_linear(x, weight, bias, layout=layout)


def _op(x, weight, bias, layout="last"):
    """The registered op, called directly (as under compile, export, modes or subclasses)."""
    return grouped_linear_op(x, weight, bias, layout)


PATHS = {"eager": _tvmgroup, "op": _op}


def _inputs(layout: str, bias: bool):
    x = torch.randn(_x_shape(layout))
    weight = torch.randn(G, O, K)
    b = torch.randn(G, O) if bias else None
    return x, weight, b


def _close(got, want, tol=1e-4, what=""):
    assert got is not None, f"{what}: no gradient"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    err = (got.double() - want).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), f"{what}: error {err:.3e}, |want| {want.abs().max().item():.3e}"


def _second_order_loss(f, x, weight, bias, layout):
    """A loss on all first-order gradients (made with create_graph=True), nonlinear in each,
    so every second-order term (and the bias one) reaches the parameters."""
    y = f(x, weight, bias, layout)
    wrt = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(y.tanh().sum(), wrt, create_graph=True)
    return sum((g.pow(2) * (i + 1)).sum() + g.sin().sum() for i, g in enumerate(grads))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_double_backward_matches_float64(path, layout, bias):
    def run(leaves, f):
        loss = _second_order_loss(f, *leaves, layout)
        wrt = [t for t in leaves if t is not None]
        return torch.autograd.grad(loss, wrt)

    tensors = _inputs(layout, bias)
    leaves32 = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    leaves64 = [t.double().requires_grad_() if t is not None else None for t in tensors]
    got, want = run(leaves32, PATHS[path]), run(leaves64, _linear64)
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert w.abs().max() > 0
        _close(g, w, what=f"d2/d{name}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_second_order_term_alone(path, layout):
    """One upstream at a time (the others unused): gradients of grad_x, grad_weight and
    grad_bias with respect to each parameter, so no term can hide behind another."""
    f = PATHS[path]
    tensors = _inputs(layout, True)
    for first in range(3):

        def run(leaves, f):
            y = f(*leaves, layout)
            g = torch.autograd.grad((y * y).sum(), leaves[first], create_graph=True)[0]
            probe = torch.linspace(-1, 1, g.numel(), dtype=g.dtype).reshape(g.shape)
            out = torch.autograd.grad((g * probe).sum(), leaves, allow_unused=True)
            return [o if o is not None else torch.zeros_like(t) for o, t in zip(out, leaves)]

        leaves32 = [t.clone().requires_grad_() for t in tensors]
        leaves64 = [t.double().requires_grad_() for t in tensors]
        for name, g, w in zip(("x", "weight", "bias"), run(leaves32, f), run(leaves64, _linear64)):
            _close(g, w, what=f"d/d{name} of grad {first}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triple_backward_matches_float64(path, layout):
    """Third derivatives: the backward of the backward is differentiable again."""

    def run(leaves, f):
        x, weight, bias = leaves
        y = f(x, weight, bias, layout)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), weight, create_graph=True)
        return torch.autograd.grad(gw.pow(2).sum() + gw.sum(), leaves)

    tensors = _inputs(layout, True)
    leaves32 = [t.clone().requires_grad_() for t in tensors]
    leaves64 = [t.double().requires_grad_() for t in tensors]
    for name, g, w in zip(("x", "weight", "bias"), run(leaves32, PATHS[path]), run(leaves64, _linear64)):
        assert w.abs().max() > 0
        _close(g, w, what=f"d3/d{name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradgradcheck_of_the_layer(layout):
    """torch.autograd.gradgradcheck (reverse over reverse and forward over reverse) against
    finite differences. The inputs are float32 (what the kernels run); the backward is
    bilinear, so central differences with a large step are exact up to rounding."""
    x, weight, bias = (t.requires_grad_() for t in _inputs(layout, True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision.*")
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: _tvmgroup(x, w, b, layout).pow(2), (x, weight, bias),
            eps=1e-2, atol=2e-3, rtol=2e-3, check_fwd_over_rev=True, check_batched_grad=True,
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_upstream_gradients(layout):
    """torch.autograd.grad(..., is_grads_batched=True) hands the backward legacy batched
    tensors (no storage): each member's gradients, first and second order, are right."""
    x, weight, bias = _inputs(layout, True)

    def run(leaves, f):
        y = f(*leaves, layout)
        v = torch.linspace(-1, 1, 3 * y.numel(), dtype=y.dtype).reshape(3, *y.shape)
        first = torch.autograd.grad(y.pow(2), leaves, v, is_grads_batched=True, create_graph=True)
        second = torch.autograd.grad(first[0].pow(2).sum(), leaves)
        return (*first, *second)

    leaves32 = [t.clone().requires_grad_() for t in (x, weight, bias)]
    leaves64 = [t.double().requires_grad_() for t in (x, weight, bias)]
    for i, (g, w) in enumerate(zip(run(leaves32, _tvmgroup), run(leaves64, _linear64))):
        _close(g, w, what=f"gradient {i}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_func_grad_of_grad(layout):
    x, weight, bias = _inputs(layout, True)

    def outer(f):
        def inner(x, w, b):
            return f(x, w, b, layout).tanh().sum()

        def loss(w, b, x):
            gx = grad(inner)(x, w, b)
            return (gx * gx).sum()

        return grad(loss, argnums=(0, 1, 2))

    got = outer(_tvmgroup)(weight, bias, x)
    want = outer(_linear64)(weight.double(), bias.double(), x.double())
    for name, g, w in zip(("weight", "bias", "x"), got, want):
        _close(g, w, what=f"grad(grad) {name}")


def test_hessians_by_every_composition_of_jacfwd_and_jacrev():
    x, weight, bias = torch.randn(2, G * K), torch.randn(G, O, K), torch.randn(G, O)
    x64, b64 = x.double(), bias.double()
    f = lambda w: _tvmgroup(x, w, bias).tanh().sum()  # noqa: E731
    f64 = lambda w: _linear64(x64, w, b64).tanh().sum()  # noqa: E731
    want = jacfwd(jacrev(f64))(weight.double())
    _close(jacfwd(jacrev(f))(weight), want)
    _close(hessian(f)(weight), want)
    _close(jacrev(jacrev(f))(weight), want)  # reverse over reverse
    _close(jacfwd(jacfwd(f))(weight), want)  # forward over forward
    # and with respect to the input, the other argument of the backward ops
    g = lambda x: _tvmgroup(x, weight, bias).pow(3).sum()  # noqa: E731
    g64 = lambda x: _linear64(x, weight.double(), b64).pow(3).sum()  # noqa: E731
    _close(jacfwd(jacrev(g))(x), jacfwd(jacrev(g64))(x64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hessian_vector_products(layout):
    """Forward over reverse (jvp of grad) and reverse over reverse (vjp of grad)."""
    x, weight, bias = _inputs(layout, True)
    v = tuple(torch.randn_like(t) for t in (x, weight, bias))

    def loss(f):
        return lambda x, w, b: f(x, w, b, layout).tanh().sum()

    def hvps(f, args, v):
        g = grad(loss(f), argnums=(0, 1, 2))
        fwd = jvp(g, args, v)[1]
        rev = vjp(g, *args)[1](v)
        return fwd, rev

    got = hvps(_tvmgroup, (x, weight, bias), v)
    want = hvps(_linear64, tuple(t.double() for t in (x, weight, bias)), tuple(t.double() for t in v))
    for mode, g_mode, w_mode in zip(("jvp(grad)", "vjp(grad)"), got, want):
        for name, g, w in zip(("x", "weight", "bias"), g_mode, w_mode):
            _close(g, w, what=f"{mode} {name}")


def test_per_sample_gradients_of_gradients():
    """vmap over grad of grad: per-sample second-order terms."""
    x, weight, bias = torch.randn(4, G * K), torch.randn(G, O, K), torch.randn(G, O)

    def per_sample(f, w, b, xs):
        def loss(w, xi):
            gx = grad(lambda xi: f(xi, w, b).tanh().sum())(xi)
            return gx.pow(2).sum()

        return torch.func.vmap(grad(loss), in_dims=(None, 0))(w, xs)

    got = per_sample(_tvmgroup, weight, bias, x)
    _close(got, per_sample(_linear64, weight.double(), bias.double(), x.double()))


def test_diversity_loss_through_action_gradients():
    """The ensemble-critic pattern: gradients of Q with respect to the actions, made with
    create_graph=True, enter a loss whose gradient reaches every parameter."""
    members, state_dim, action_dim, hidden = 3, 3, 2, 8
    w1, b1 = torch.randn(members, hidden, state_dim + action_dim), torch.randn(members, hidden)
    w2, b2 = torch.randn(members, 1, hidden), torch.randn(members, 1)
    state, action = torch.randn(6, state_dim), torch.randn(6, action_dim)

    def loss(f, w1, b1, w2, b2):
        a = action.to(w1.dtype).requires_grad_()
        sa = torch.cat([state.to(w1.dtype), a], dim=-1).repeat(1, members)  # every member sees (s, a)
        q = f(torch.relu(f(sa, w1, b1)).tanh(), w2, b2)  # (batch, members)
        (dq_da,) = torch.autograd.grad(q.sum(), a, create_graph=True)
        per_member = torch.autograd.grad(q, a, torch.eye(members)[0].to(q.dtype).expand_as(q), create_graph=True)[0]
        return q.pow(2).mean() + dq_da.pow(2).sum() + (per_member * dq_da).sum()

    params = (w1, b1, w2, b2)
    leaves32 = [p.clone().requires_grad_() for p in params]
    leaves64 = [p.double().requires_grad_() for p in params]
    got = torch.autograd.grad(loss(_tvmgroup, *leaves32), leaves32)
    want = torch.autograd.grad(loss(_linear64, *leaves64), leaves64)
    for name, g, w in zip(("w1", "b1", "w2", "b2"), got, want):
        assert w.abs().max() > 0
        _close(g, w, what=name)


# ---------------------------------------------------------------------------------------------
# the registered backward ops


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_grad_input_with_autograd(layout):
    grad_y = torch.randn((13, G * O) if layout == "last" else (2, G * O, 13), requires_grad=True)
    weight = torch.randn(G, O, K, requires_grad=True)
    torch.library.opcheck(grad_input_op, (grad_y, weight, layout), raise_exception=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_grad_weight_with_autograd(layout, with_bias):
    shape = (13, G * O) if layout == "last" else (2, G * O, 13)
    grad_y = torch.randn(shape, requires_grad=True)
    x = torch.randn((13, G * K) if layout == "last" else (2, G * K, 13), requires_grad=True)
    weight = torch.randn(G, O, K, requires_grad=True)  # gives shapes only: no gradient
    torch.library.opcheck(grad_weight_op, (grad_y, x, weight, with_bias, layout), raise_exception=True)


def test_registered_double_backward_records_the_registered_ops():
    """Through the registered op, a recorded backward is made of tvmgroup ops again."""
    x, weight, bias = (t.requires_grad_() for t in _inputs("last", True))
    y = _op(x, weight, bias, "last")
    gx, gw = torch.autograd.grad(y.tanh().sum(), (x, weight), create_graph=True)
    names = set()
    stack = [gx.grad_fn, gw.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node.name() in names:
            continue
        names.add(node.name())
        stack.extend(n for n, _ in node.next_functions)
    assert any("grouped_linear_grad_input" in n for n in names), names
    assert any("grouped_linear_grad_weight" in n for n in names), names
