"""The custom ops under torch.library.opcheck, torch.compile(fullgraph=True) and torch.export."""

from __future__ import annotations

import pytest
import torch

from tvmgroup import GroupedLinear
from tvmgroup.ops import grad_input_op, grad_weight_op, grouped_linear_op

G, K, O = 3, 5, 4


def _opcheck(op, args) -> None:
    # All of opcheck's checks (schema, autograd registration, fake tensor, AOT dispatch).
    torch.library.opcheck(op, args, raise_exception=True)


@pytest.mark.parametrize("layout", ["last", "conv"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_forward(layout, bias):
    x = torch.randn((13, G * K) if layout == "last" else (2, G * K, 13), requires_grad=True)
    weight = torch.randn(G, O, K, requires_grad=True)
    b = torch.randn(G, O, requires_grad=True) if bias else None
    _opcheck(grouped_linear_op, (x, weight, b, layout))


@pytest.mark.parametrize("layout", ["last", "conv"])
def test_opcheck_grad_input(layout):
    grad_y = torch.randn((13, G * O) if layout == "last" else (2, G * O, 13))
    _opcheck(grad_input_op, (grad_y, torch.randn(G, O, K), layout))


@pytest.mark.parametrize("layout", ["last", "conv"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_grad_weight(layout, with_bias):
    if layout == "last":
        grad_y, x = torch.randn(13, G * O), torch.randn(13, G * K)
    else:
        grad_y, x = torch.randn(2, G * O, 13), torch.randn(2, G * K, 13)
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


@pytest.mark.parametrize("layout", ["last", "conv"])
def test_torch_compile_fullgraph_matches_eager(layout):
    torch._dynamo.reset()
    module = _Block(layout)
    compiled = torch.compile(module, fullgraph=True)
    for shape in ([(13, G * K), (7, G * K)] if layout == "last" else [(2, G * K, 13)]):
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


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b = torch.randn(2, 7, G * K), torch.randn(G, O, K), torch.randn(G, O)
        assert grouped_linear_op(x, w, b, "last").shape == (2, 7, G * O)
        assert grad_input_op(torch.randn(4, G * O, 9), w, "conv").shape == (4, G * K, 9)
        gw, gb = grad_weight_op(torch.randn(6, G * O), torch.randn(6, G * K), w, False, "last")
        assert gw.shape == (G, O, K) and gb.shape == (0,)
