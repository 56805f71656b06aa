"""The custom ops under torch.library.opcheck, torch.compile(fullgraph=True) and torch.export."""

from __future__ import annotations

import pytest
import torch

from tvmgroup import GroupedLinear
from tvmgroup.ops import backward_op, grad_input_op, grad_weight_op, grouped_linear_op

G, K, O = 3, 5, 4


def _rows(layout: str, features: int) -> tuple[int, ...]:
    """A row-indexed tensor's user shape in ``layout`` (13 rows; conv: 2 x 13)."""
    return {"last": (13, G * features), "conv": (2, G * features, 13), "groups_last": (13, features, G), "heads": (13, G, features)}[layout]


def _opcheck(op, args) -> None:
    # All of opcheck's checks (schema, autograd registration, fake tensor, AOT dispatch).
    torch.library.opcheck(op, args, raise_exception=True)


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_forward(layout, bias):
    x = torch.randn(_rows(layout, K), requires_grad=True)
    weight = torch.randn(G, O, K, requires_grad=True)
    b = torch.randn(G, O, requires_grad=True) if bias else None
    _opcheck(grouped_linear_op, (x, weight, b, layout))


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
def test_opcheck_grad_input(layout):
    grad_y = torch.randn(_rows(layout, O))
    _opcheck(grad_input_op, (grad_y, torch.randn(G, O, K), layout))


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_grad_weight(layout, with_bias):
    grad_y, x = torch.randn(_rows(layout, O)), torch.randn(_rows(layout, K))
    _opcheck(grad_weight_op, (grad_y, x, torch.randn(G, O, K), with_bias, layout))


class _Block(torch.nn.Module):
    """A layer between two torch ops, so the compiled graph is more than the custom op."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layer = GroupedLinear(G, K, O, layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(x * 2.0)).sum(dim=-1)


def _grads_of(module: torch.nn.Module, fn, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = fn(x)
    out.sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
def test_torch_compile_fullgraph_matches_eager(layout):
    torch._dynamo.reset()
    module = _Block(layout)
    compiled = torch.compile(module, fullgraph=True)
    shapes = {"last": [(13, G * K), (7, G * K)], "conv": [(2, G * K, 13)], "groups_last": [(13, K, G), (2, 7, K, G)],
              "heads": [(13, G, K), (2, 7, G, K)]}
    for shape in shapes[layout]:
        x = torch.randn(shape)
        out_eager, grads_eager = _grads_of(module, module, x)
        out_comp, grads_comp = _grads_of(module, compiled, x)
        torch.testing.assert_close(out_comp, out_eager, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads_comp, grads_eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_export_of_the_layer():
    layer = GroupedLinear(G, K, O)
    x = torch.randn(13, G * K)
    exported = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("tvmgroup.grouped_linear" in t for t in targets), targets
    x2 = torch.randn(13, G * K)
    torch.testing.assert_close(exported.module()(x2), layer(x2), rtol=0, atol=0)


def test_torch_export_with_a_dynamic_batch():
    layer = GroupedLinear(G, K, O, layout="conv")
    batch = torch.export.Dim("batch", min=1, max=64)
    length = torch.export.Dim("length", min=2, max=1024)
    exported = torch.export.export(
        layer, (torch.randn(2, G * K, 9),), dynamic_shapes={"x": {0: batch, 2: length}}
    )
    x = torch.randn(5, G * K, 31)
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)


def test_torch_export_of_a_groups_last_layer_with_a_dynamic_batch():
    layer = GroupedLinear(G, K, O, layout="groups_last", weight_layout="in_out")
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(layer, (torch.randn(2, K, G),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(37, K, G)
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b = torch.randn(2, 7, G * K), torch.randn(G, O, K), torch.randn(G, O)
        assert grouped_linear_op(x, w, b, "last").shape == (2, 7, G * O)
        assert grad_input_op(torch.randn(4, G * O, 9), w, "conv").shape == (4, G * K, 9)
        gw, gb = grad_weight_op(torch.randn(6, G * O), torch.randn(6, G * K), w, False, "last")
        assert gw.shape == (G, O, K) and gb.shape == (0,)
        gx, gw, gb = backward_op(torch.randn(G, 6, O), torch.randn(G, 6, K), w.transpose(1, 2), True, "ensemble", "in_out")
        assert gx.shape == (G, 6, K) and gw.shape == (G, K, O) and gb.shape == (G, O)
        assert grouped_linear_op(torch.randn(2, 7, K, G), w, b, "groups_last").shape == (2, 7, O, G)
        assert grad_input_op(torch.randn(6, O, G), w, "groups_last").shape == (6, K, G)


# ---------------------------------------------------------------------------------------------
# function transforms and forward-mode AD, against the same computation in float64


def _ref64(x, weight, bias, layout="last"):
    from tvmgroup.layouts import layout_of
    from tvmgroup.opdefs import reference_pass

    lay = layout_of(layout)
    grad_y = torch.zeros(lay.out_shape(x, weight.shape[0], weight.shape[1]), dtype=torch.float64)
    return reference_pass(lay, x, weight, bias, grad_y)["y"]


def _linear64(x, weight, bias, layout="last"):
    """The op written with differentiable torch ops, for transforms of the reference."""
    g, o, k = weight.shape
    if layout == "last":
        xs = x.reshape(*x.shape[:-1], g, k)
        return (torch.einsum("...gk,gok->...go", xs, weight) + bias).reshape(*x.shape[:-1], g * o)
    xs = x.reshape(x.shape[0], g, k, x.shape[-1])
    return (torch.einsum("bgkl,gok->bgol", xs, weight) + bias[None, :, :, None]).reshape(x.shape[0], g * o, x.shape[-1])


def _params(shape=(5, 12)):
    return torch.randn(shape), torch.randn(3, 4, 4), torch.randn(3, 4)


def _close(got, want, tol=1e-4):
    assert got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= tol * (1 + want.abs().max().item())


def test_forward_mode_jvp_is_the_tangent_not_zero():
    from torch.func import jvp

    from tvmgroup import grouped_linear

    x, w, b = _params()
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    _, got = jvp(grouped_linear, (x, w, b), tangents)
    _, want = jvp(_linear64, tuple(t.double() for t in (x, w, b)), tuple(t.double() for t in tangents))
    assert got.abs().max() > 0
    _close(got, want)


def test_forward_ad_dual_tensors():
    import torch.autograd.forward_ad as fwad

    from tvmgroup import grouped_linear

    x, w, b = _params()
    tx = torch.randn_like(x)
    with fwad.dual_level():
        y = grouped_linear(fwad.make_dual(x, tx), w, b)
        tangent = fwad.unpack_dual(y).tangent
    _close(tangent, _ref64(tx, w, torch.zeros_like(b)))


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
def test_vmap_over_inputs_joins_rows(layout):
    from torch.func import vmap

    from tvmgroup import grouped_linear

    x, w, b = _params({"last": (6, 5, 12), "conv": (6, 2, 12, 7), "groups_last": (6, 5, 4, 3), "heads": (6, 5, 3, 4)}[layout])
    got = vmap(lambda xi: grouped_linear(xi, w, b, layout=layout))(x)
    _close(got, torch.stack([_ref64(xi, w, b, layout) for xi in x]))


def test_vmap_over_stacked_parameters():
    """Ensembles of layers: parameters batched, one input shared."""
    from torch.func import vmap

    from tvmgroup import grouped_linear

    x, _, _ = _params()
    ws, bs = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4)
    got = vmap(lambda w, b: grouped_linear(x, w, b))(ws, bs)
    _close(got, torch.stack([_ref64(x, w, b) for w, b in zip(ws, bs)]))


def test_func_grad_jacrev_and_per_sample_gradients():
    from torch.func import grad, jacrev, vmap

    from tvmgroup import grouped_linear

    x, w, b = _params()
    x64, w64, b64 = (t.double() for t in (x, w, b))
    _close(grad(lambda w: grouped_linear(x, w, b).pow(2).sum())(w), grad(lambda w: _linear64(x64, w, b64).pow(2).sum())(w64))
    _close(jacrev(lambda w: grouped_linear(x, w, b))(w), jacrev(lambda w: _linear64(x64, w, b64))(w64))
    per_sample = vmap(grad(lambda w, xi: grouped_linear(xi, w, b).pow(2).sum()), in_dims=(None, 0))(w, x)
    want = vmap(grad(lambda w, xi: _linear64(xi, w, b64).pow(2).sum()), in_dims=(None, 0))(w64, x64)
    _close(per_sample, want)


# ---------------------------------------------------------------------------------------------
# layout="ensemble" (and a (G, K, O) weight), as the ops above


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_ensemble(bias, weight_layout):
    from tvmgroup.weights import weight_shape

    x = torch.randn(G, 13, K, requires_grad=True)
    weight = torch.randn(weight_shape(G, K, O, weight_layout), requires_grad=True)
    b = torch.randn(G, 1, O, requires_grad=True) if bias else None
    _opcheck(grouped_linear_op, (x, weight, b, "ensemble", weight_layout))
    grad_y = torch.randn(G, 13, O)
    _opcheck(grad_input_op, (grad_y, weight.detach(), "ensemble", weight_layout))
    _opcheck(grad_weight_op, (grad_y, x.detach(), weight.detach(), bias, "ensemble", weight_layout))


def test_torch_compile_fullgraph_ensemble():
    torch._dynamo.reset()
    module = _Block("ensemble")
    compiled = torch.compile(module, fullgraph=True)
    for shape in [(G, 13, K), (G, 2, 7, K)]:
        x = torch.randn(shape)
        out_eager, grads_eager = _grads_of(module, module, x)
        out_comp, grads_comp = _grads_of(module, compiled, x)
        torch.testing.assert_close(out_comp, out_eager, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads_comp, grads_eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_export_ensemble_with_a_dynamic_batch():
    layer = GroupedLinear(G, K, O, layout="ensemble", weight_layout="in_out", bias_layout="broadcast")
    batch = torch.export.Dim("batch", min=2, max=1024)
    exported = torch.export.export(layer, (torch.randn(G, 9, K),), dynamic_shapes={"x": {1: batch}})
    x = torch.randn(G, 31, K)
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the fused backward: which ops a backward pass runs, and its numerics


@pytest.fixture
def ran_ops(monkeypatch) -> list[str]:
    """The ops whose kernels run, in order (every kernel call goes through ``ops._run``)."""
    from tvmgroup import ops

    calls: list[str] = []
    run = ops._run
    monkeypatch.setattr(ops, "_run", lambda op, *args: (calls.append(op), run(op, *args))[1])
    return calls


_X_SHAPES = {"last": (7, G * K), "conv": (2, G * K, 6), "ensemble": (G, 7, K), "heads": (7, G, K), "shared": (7, K),
             "shared_last": (7, K)}


def _backward_ops(layout: str, needs: tuple[bool, bool, bool], calls: list[str], **kwargs) -> list[str]:
    layer = GroupedLinear(G, K, O, layout=layout, **kwargs)
    x = torch.randn(_X_SHAPES[layout], requires_grad=needs[0])
    layer.weight.requires_grad_(needs[1])
    layer.bias.requires_grad_(needs[2])
    y = layer(x)
    del calls[:]
    y.backward(torch.randn_like(y))
    return list(calls)


@pytest.mark.parametrize("layout", ["last", "conv", "ensemble", "heads", "shared", "shared_last"])
def test_eager_backward_runs_the_fused_op_where_x_and_a_parameter_need_gradients(layout, ran_ops):
    assert _backward_ops(layout, (True, True, True), ran_ops) == ["backward"]
    assert _backward_ops(layout, (True, True, False), ran_ops) == ["backward"]
    assert _backward_ops(layout, (True, False, True), ran_ops) == ["backward"]
    assert _backward_ops(layout, (True, False, False), ran_ops) == ["grad_input"]
    assert _backward_ops(layout, (False, True, True), ran_ops) == ["grad_weight"]
    assert _backward_ops(layout, (False, False, True), ran_ops) == ["grad_weight"]


def test_fused_backward_flag_runs_the_two_ops(ran_ops, monkeypatch):
    from tvmgroup import ops

    monkeypatch.setattr(ops, "FUSED_BACKWARD", False)
    assert _backward_ops("last", (True, True, True), ran_ops) == ["grad_input", "grad_weight"]


def test_a_layout_without_a_fused_schedule_runs_the_two_ops(ran_ops, monkeypatch):
    """Support is what the template declares (schedules.EXTRA_OPS): a layout it does not
    name, as a newly added layout would be, falls back to grad_input and grad_weight."""
    from tvmgroup import ops, schedules

    monkeypatch.setitem(schedules.EXTRA_OPS["llvm"], "backward", frozenset({"last", "ensemble"}))
    monkeypatch.setattr(ops, "_fuses", {})
    assert _backward_ops("conv", (True, True, True), ran_ops) == ["grad_input", "grad_weight"]
    assert _backward_ops("last", (True, True, True), ran_ops) == ["backward"]
    ops._fuses.clear()


def test_cuda_backward_runs_the_two_ops():
    """The CUDA family has no fused backward: the decision reads the family's template (no
    GPU needed to see which functions the pass calls)."""
    from tvmgroup import ops

    assert not ops.fuses_backward("cuda", "last") and ops.fuses_backward("cpu", "last")

    class OnCuda:
        device = torch.device("cuda")

    called = []
    outs = {"grad_input": "gx", "grad_weight": ("gw", torch.zeros(G, O)), "backward": ("gx", "gw", torch.zeros(G, O))}
    fns = [lambda *a, name=name: called.append(name) or outs[name] for name in outs]
    saved = (torch.empty(0), torch.empty(G, O, K))
    grads = ops._backward_pass(saved, (True, True, True), "last", True, OnCuda(), *fns[:2], "out_in", (G, O), fns[2])
    assert called == ["grad_input", "grad_weight"] and grads[:2] == ("gx", "gw")
    called.clear()
    ops._backward_pass(saved, (True, True, True), "last", True, torch.empty(0), *fns[:2], "out_in", (G, O), fns[2])
    assert called == ["backward"]  # the same call on a CPU tensor fuses


@pytest.mark.parametrize("rows", [1, 13, 97, 256])
@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["last", "conv", "ensemble", "heads", "shared", "shared_last"])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_fused_backward_matches_float64(path, layout, bias, weight_layout, rows, ran_ops, ref_grads, close):
    """Gradients from the fused op (eager path, and the registered op's autograd) against
    float64, at row counts that are not multiples of the row tile."""
    from tvmgroup.layouts import SHARED_INPUTS
    from tvmgroup.weights import as_out_in, weight_shape

    shape = {"last": (rows, G * K), "conv": (2, G * K, rows), "ensemble": (G, rows, K), "heads": (rows, G, K)}.get(
        layout, (rows, K))
    shared = SHARED_INPUTS.get(layout)
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(weight_shape(G, K, O, weight_layout), requires_grad=True)
    b = torch.randn(G, O, requires_grad=True) if bias else None
    if path == "eager":
        from tvmgroup import grouped_linear

        y = grouped_linear(x, weight, b, layout=layout, weight_layout=weight_layout)
    else:
        if shared is None:
            y = grouped_linear_op(x, weight, b, layout, weight_layout)
        else:
            y = shared.output(grouped_linear_op(shared.expand(x, G), weight, b, shared.kernel_layout, weight_layout))
    grad_y = torch.randn_like(y)
    del ran_ops[:]
    y.backward(grad_y)
    assert ran_ops == ["backward"]
    if shared is not None:  # the reference on the expanded input; grad_x is summed over the groups
        grad_y_k = grad_y if shared.kernel_layout == "ensemble" else grad_y.unflatten(-1, (G, O))
        expect = ref_grads(shared.expand(x.detach(), G), as_out_in(weight.detach(), weight_layout), b, grad_y_k,
                           shared.kernel_layout)
        value, mag, depth = expect["x"]
        expect["x"] = (value.sum(shared.group_axis), mag.sum(shared.group_axis), depth * G)
    else:
        expect = ref_grads(x.detach(), as_out_in(weight.detach(), weight_layout), b, grad_y, layout)
    close(x.grad, *expect["x"], what="grad_x")
    close(as_out_in(weight.grad, weight_layout), *expect["weight"], what="grad_weight")
    if bias:
        close(b.grad, *expect["bias"], what="grad_bias")
