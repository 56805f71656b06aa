"""Gradients of gradients: the backward ops are differentiable again, in the eager path
(``EagerGroupedLinear`` and its backward Functions) and through the registered ops.

Every result is checked against the same computation written with plain torch ops in float64
(``_linear64``), on random inputs with K != O so a transposed weight cannot pass, for every
layout and both weight conventions (``CASES``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp

from tvmgroup import grouped_linear
from tvmgroup.layouts import SHARED_INPUTS
from tvmgroup.ops import backward_op, grad_input_op, grad_weight_op, grouped_linear_op
from tvmgroup.schedules import supports
from tvmgroup.weights import bias_shape, weight_shape

G, K, O = 3, 4, 5


@dataclass(frozen=True)
class Case:
    """A layout with a weight convention and a bias shape (:mod:`tvmgroup.weights`)."""

    layout: str
    weight_layout: str = "out_in"
    bias_layout: str = "grouped"


# Test parameters name cases: a layout alone has the default parameters; "-in_out" stores the
# weight (G, K, O) and the bias (G, 1, O), as RL ensembles keep them.
CASES = {
    "last": Case("last"),
    "conv": Case("conv"),
    "last-in_out": Case("last", "in_out", "broadcast"),
    "conv-in_out": Case("conv", "in_out", "broadcast"),
    "ensemble": Case("ensemble"),
    "ensemble-in_out": Case("ensemble", "in_out", "broadcast"),
    "shared-in_out": Case("shared", "in_out", "broadcast"),
    "groups_last": Case("groups_last"),
    "heads": Case("heads"),
    "shared_last-in_out": Case("shared_last", "in_out", "broadcast"),
    "groups_last-in_out": Case("groups_last", "in_out", "flat"),
}


def _x_shape(case: str) -> tuple[int, ...]:
    return {
        "last": (7, G * K), "conv": (2, G * K, 6), "ensemble": (G, 2, 3, K), "shared": (7, K), "shared_last": (2, 3, K),
        "groups_last": (2, 3, K, G), "heads": (2, 3, G, K),
    }[CASES[case].layout]


def _linear64(x, weight, bias, case="last"):
    """The op with differentiable torch ops (einsum), for the float64 side of each check."""
    c = CASES[case]
    w = weight if c.weight_layout == "out_in" else weight.transpose(1, 2)  # (G, O, K)
    g, o, k = w.shape
    b = bias.reshape(g, o) if bias is not None else None
    if c.layout == "last":
        y = torch.einsum("...gk,gok->...go", x.reshape(*x.shape[:-1], g, k), w)
        if b is not None:
            y = y + b
        return y.reshape(*x.shape[:-1], g * o)
    if c.layout == "conv":
        y = torch.einsum("bgkl,gok->bgol", x.reshape(x.shape[0], g, k, x.shape[-1]), w)
        if b is not None:
            y = y + b[None, :, :, None]
        return y.reshape(x.shape[0], g * o, x.shape[-1])
    if c.layout == "groups_last":
        y = torch.einsum("...kg,gok->...og", x, w)
        return y + b.t() if b is not None else y
    if c.layout in ("heads", "shared_last"):
        y = torch.einsum("...gk,gok->...go" if c.layout == "heads" else "...k,gok->...go", x, w)
        y = y + b if b is not None else y
        return y if c.layout == "heads" else y.flatten(-2)
    rows = x.shape[1:-1] if c.layout == "ensemble" else x.shape[:-1]
    y = torch.einsum("g...k,gok->g...o" if c.layout == "ensemble" else "...k,gok->g...o", x, w)
    if b is not None:
        y = y + b.view(g, *[1] * len(rows), o)
    return y


def _tvmgroup(x, weight, bias, case="last"):
    c = CASES[case]
    return grouped_linear(x, weight, bias, layout=c.layout, weight_layout=c.weight_layout)


def _op(x, weight, bias, case="last"):
    """The registered op, called directly (as under compile, export, modes or subclasses);
    a shared input expanded over the groups, as the functional form passes it."""
    c = CASES[case]
    shared = SHARED_INPUTS.get(c.layout)
    if shared is not None:
        return shared.output(grouped_linear_op(shared.expand(x, G), weight, bias, shared.kernel_layout, c.weight_layout))
    return grouped_linear_op(x, weight, bias, c.layout, c.weight_layout)


PATHS = {"eager": _tvmgroup, "op": _op}


def _inputs(case: str, bias: bool):
    c = CASES[case]
    x = torch.randn(_x_shape(case))
    weight = torch.randn(weight_shape(G, K, O, c.weight_layout))
    b = torch.randn(bias_shape(G, O, c.bias_layout)) if bias else None
    return x, weight, b


def _close(got, want, tol=1e-4, what=""):
    assert got is not None, f"{what}: no gradient"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    err = (got.double() - want).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), f"{what}: error {err:.3e}, |want| {want.abs().max().item():.3e}"


def _second_order_loss(f, x, weight, bias, case):
    """A loss on all first-order gradients (made with create_graph=True), nonlinear in each,
    so every second-order term (and the bias one) reaches the parameters."""
    y = f(x, weight, bias, case)
    wrt = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(y.tanh().sum(), wrt, create_graph=True)
    return sum((g.pow(2) * (i + 1)).sum() + g.sin().sum() for i, g in enumerate(grads))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_double_backward_matches_float64(path, case, bias):
    def run(leaves, f):
        loss = _second_order_loss(f, *leaves, case)
        wrt = [t for t in leaves if t is not None]
        return torch.autograd.grad(loss, wrt)

    tensors = _inputs(case, bias)
    leaves32 = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    leaves64 = [t.double().requires_grad_() if t is not None else None for t in tensors]
    got, want = run(leaves32, PATHS[path]), run(leaves64, _linear64)
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert w.abs().max() > 0
        _close(g, w, what=f"d2/d{name}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_each_second_order_term_alone(path, case):
    """One upstream at a time (the others unused): gradients of grad_x, grad_weight and
    grad_bias with respect to each parameter, so no term can hide behind another."""
    f = PATHS[path]
    tensors = _inputs(case, True)
    for first in range(3):

        def run(leaves, f):
            y = f(*leaves, case)
            g = torch.autograd.grad((y * y).sum(), leaves[first], create_graph=True)[0]
            probe = torch.linspace(-1, 1, g.numel(), dtype=g.dtype).reshape(g.shape)
            out = torch.autograd.grad((g * probe).sum(), leaves, allow_unused=True)
            return [o if o is not None else torch.zeros_like(t) for o, t in zip(out, leaves)]

        leaves32 = [t.clone().requires_grad_() for t in tensors]
        leaves64 = [t.double().requires_grad_() for t in tensors]
        for name, g, w in zip(("x", "weight", "bias"), run(leaves32, f), run(leaves64, _linear64)):
            _close(g, w, what=f"d/d{name} of grad {first}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_triple_backward_matches_float64(path, case):
    """Third derivatives: the backward of the backward is differentiable again."""

    def run(leaves, f):
        x, weight, bias = leaves
        y = f(x, weight, bias, case)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), weight, create_graph=True)
        return torch.autograd.grad(gw.pow(2).sum() + gw.sum(), leaves)

    tensors = _inputs(case, True)
    leaves32 = [t.clone().requires_grad_() for t in tensors]
    leaves64 = [t.double().requires_grad_() for t in tensors]
    for name, g, w in zip(("x", "weight", "bias"), run(leaves32, PATHS[path]), run(leaves64, _linear64)):
        assert w.abs().max() > 0
        _close(g, w, what=f"d3/d{name}")


@pytest.mark.parametrize("case", list(CASES))
def test_gradgradcheck_of_the_layer(case):
    """torch.autograd.gradgradcheck (reverse over reverse and forward over reverse) against
    finite differences. The inputs are float32 (what the kernels run); the backward is
    bilinear, so central differences with a large step are exact up to rounding."""
    x, weight, bias = (t.requires_grad_() for t in _inputs(case, True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision.*")
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: _tvmgroup(x, w, b, case).pow(2), (x, weight, bias),
            eps=1e-2, atol=2e-3, rtol=2e-3, check_fwd_over_rev=True, check_batched_grad=True,
        )


@pytest.mark.parametrize("case", list(CASES))
def test_batched_upstream_gradients(case):
    """torch.autograd.grad(..., is_grads_batched=True) hands the backward legacy batched
    tensors (no storage): each member's gradients, first and second order, are right."""
    x, weight, bias = _inputs(case, True)

    def run(leaves, f):
        y = f(*leaves, case)
        v = torch.linspace(-1, 1, 3 * y.numel(), dtype=y.dtype).reshape(3, *y.shape)
        first = torch.autograd.grad(y.pow(2), leaves, v, is_grads_batched=True, create_graph=True)
        second = torch.autograd.grad(first[0].pow(2).sum(), leaves)
        return (*first, *second)

    leaves32 = [t.clone().requires_grad_() for t in (x, weight, bias)]
    leaves64 = [t.double().requires_grad_() for t in (x, weight, bias)]
    for i, (g, w) in enumerate(zip(run(leaves32, _tvmgroup), run(leaves64, _linear64))):
        _close(g, w, what=f"gradient {i}")


@pytest.mark.parametrize("case", list(CASES))
def test_func_grad_of_grad(case):
    x, weight, bias = _inputs(case, True)

    def outer(f):
        def inner(x, w, b):
            return f(x, w, b, case).tanh().sum()

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


@pytest.mark.parametrize("case", list(CASES))
def test_hessian_vector_products(case):
    """Forward over reverse (jvp of grad) and reverse over reverse (vjp of grad)."""
    x, weight, bias = _inputs(case, True)
    v = tuple(torch.randn_like(t) for t in (x, weight, bias))

    def loss(f):
        return lambda x, w, b: f(x, w, b, case).tanh().sum()

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


def test_diversity_loss_with_ensemble_parameters():
    """The same pattern as an RL ensemble stores it: weights (E, in, out), biases (E, 1, out),
    a shared first layer on (s, a) and "ensemble" layers after it."""
    members, state_dim, action_dim, hidden = 3, 3, 2, 8
    w1, b1 = torch.randn(members, state_dim + action_dim, hidden), torch.randn(members, 1, hidden)
    w2, b2 = torch.randn(members, hidden, hidden), torch.randn(members, 1, hidden)
    w3, b3 = torch.randn(members, hidden, 1), torch.randn(members, 1, 1)
    state, action = torch.randn(6, state_dim), torch.randn(6, action_dim)

    def loss(f, w1, b1, w2, b2, w3, b3):
        a = action.to(w1.dtype).requires_grad_()
        sa = torch.cat([state.to(w1.dtype), a], dim=-1)
        h = torch.relu(f(sa, w1, b1, "shared-in_out")).tanh()  # (E, batch, hidden)
        q = f(torch.relu(f(h, w2, b2, "ensemble-in_out")), w3, b3, "ensemble-in_out")  # (E, batch, 1)
        (dq_da,) = torch.autograd.grad(q.sum(), a, create_graph=True)
        per_member = torch.autograd.grad(q[0].sum(), a, create_graph=True)[0]
        return q.pow(2).mean() + dq_da.pow(2).sum() + (per_member * dq_da).sum()

    params = (w1, b1, w2, b2, w3, b3)
    for path in PATHS.values():
        leaves32 = [p.clone().requires_grad_() for p in params]
        leaves64 = [p.double().requires_grad_() for p in params]
        got = torch.autograd.grad(loss(path, *leaves32), leaves32)
        want = torch.autograd.grad(loss(_linear64, *leaves64), leaves64)
        for name, g, w in zip(("w1", "b1", "w2", "b2", "w3", "b3"), got, want):
            assert w.abs().max() > 0
            _close(g, w, what=name)


# ---------------------------------------------------------------------------------------------
# the registered backward ops


# the kernel layouts, each with both weight conventions
OP_CASES = [c for c in CASES if CASES[c].layout not in SHARED_INPUTS]
# The registered fused backward runs where the CPU template schedules it.
FUSED_CASES = [c for c in OP_CASES if supports("llvm", "backward", CASES[c].layout)]


def _rows_tensor(case: str, features: int) -> torch.Tensor:
    shape = {"last": (13, G * features), "conv": (2, G * features, 13), "ensemble": (G, 13, features),
             "groups_last": (13, features, G), "heads": (13, G, features)}
    return torch.randn(shape[CASES[case].layout], requires_grad=True)


@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck_grad_input_with_autograd(case):
    c = CASES[case]
    weight = torch.randn(weight_shape(G, K, O, c.weight_layout), requires_grad=True)
    args = (_rows_tensor(case, O), weight, c.layout, c.weight_layout)
    torch.library.opcheck(grad_input_op, args, raise_exception=True)


@pytest.mark.parametrize("case", OP_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_grad_weight_with_autograd(case, with_bias):
    c = CASES[case]
    weight = torch.randn(weight_shape(G, K, O, c.weight_layout), requires_grad=True)  # shapes only: no gradient
    args = (_rows_tensor(case, O), _rows_tensor(case, K), weight, with_bias, c.layout, c.weight_layout)
    torch.library.opcheck(grad_weight_op, args, raise_exception=True)


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_fused_backward_with_autograd(case, with_bias):
    """The fused backward op's schema, fake, autograd registration and AOT dispatch, with
    grad_y, x and the weight all requiring gradients (its derivatives are the other ops)."""
    c = CASES[case]
    weight = torch.randn(weight_shape(G, K, O, c.weight_layout), requires_grad=True)
    args = (_rows_tensor(case, O), _rows_tensor(case, K), weight, with_bias, c.layout, c.weight_layout)
    torch.library.opcheck(backward_op, args, raise_exception=True)


def _recorded_ops(*grads) -> set[str]:
    names = set()
    stack = [g.grad_fn for g in grads]
    while stack:
        node = stack.pop()
        if node is None or node.name() in names:
            continue
        names.add(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_registered_double_backward_records_the_registered_ops():
    """Through the registered op, a recorded backward is made of tvmgroup ops again: the
    fused backward where x and the weight need gradients, the two ops where one does."""
    x, weight, bias = (t.requires_grad_() for t in _inputs("last", True))
    y = _op(x, weight, bias, "last")
    names = _recorded_ops(*torch.autograd.grad(y.tanh().sum(), (x, weight), create_graph=True))
    assert any("grouped_linear_backward" in n for n in names), names
    assert not any("grouped_linear_grad_input" in n for n in names), names
    y = _op(x, weight.detach(), None, "last")
    names = _recorded_ops(*torch.autograd.grad(y.tanh().sum(), (x,), create_graph=True))
    assert any("grouped_linear_grad_input" in n for n in names), names
    assert not any("grouped_linear_backward" in n for n in names), names
    y = _op(x.detach(), weight, bias, "last")
    names = _recorded_ops(*torch.autograd.grad(y.tanh().sum(), (weight, bias), create_graph=True))
    assert any("grouped_linear_grad_weight" in n for n in names), names
    assert not any("grouped_linear_backward" in n for n in names), names


@pytest.mark.parametrize("case", FUSED_CASES)
def test_second_derivatives_of_the_fused_backward_op(case):
    """Each upstream of the fused op alone (grad_x, grad_weight, grad_bias), against the
    same derivatives of grad_input and grad_weight written with float64 torch ops."""
    c = CASES[case]
    grad_y, x = _rows_tensor(case, O), _rows_tensor(case, K)
    weight = torch.randn(weight_shape(G, K, O, c.weight_layout), requires_grad=True)

    def run(leaves, f):
        out = f(*leaves)
        probes = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape) for t in out]
        grads = [
            torch.autograd.grad((t * p).sum(), leaves, allow_unused=True, retain_graph=True)
            for t, p in zip(out, probes)
        ]
        return [[g if g is not None else torch.zeros_like(t) for g, t in zip(gs, leaves)] for gs in grads]

    def fused(gy, xx, w):
        return backward_op(gy, xx, w, True, c.layout, c.weight_layout)

    def reference(gy, xx, w):
        y = _linear64(xx, w, None, case)  # grad_x, grad_w, grad_b are this op's vjp with upstream gy
        b = torch.zeros(G, O, dtype=gy.dtype, requires_grad=True)
        y = y + _linear64(torch.zeros_like(xx), torch.zeros_like(w), b, case)
        return torch.autograd.grad(y, (xx, w, b), gy, create_graph=True)

    leaves32 = [t.detach().clone().requires_grad_() for t in (grad_y, x, weight)]
    leaves64 = [t.detach().double().requires_grad_() for t in (grad_y, x, weight)]
    for i, (gots, wants) in enumerate(zip(run(leaves32, fused), run(leaves64, reference))):
        for name, g, w in zip(("grad_y", "x", "weight"), gots, wants):
            _close(g, w, what=f"d/d{name} of output {i}")
