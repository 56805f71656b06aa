"""Bad inputs raise errors that name what was expected and what came."""

from __future__ import annotations

import pytest
import torch

from tvmgroup import GroupedLinear, grouped_linear
from tvmgroup.validation import check_dtype, check_input, check_layout, check_weight

W = torch.randn(3, 4, 5)  # groups=3, out_features=4, in_features=5
B = torch.randn(3, 4)


@pytest.mark.parametrize(
    "x, layout, match",
    [
        (torch.randn(13, 14), "last", r"groups\*in_features = 3\*5 = 15, got x of shape \(13, 14\)"),
        (torch.randn(13, 16), "last", r"= 15, got x of shape \(13, 16\)"),
        (torch.tensor(1.0), "last", "at least 1 dim .* got a 0-dim tensor"),
        (torch.randn(13, 15), "conv", r"expects x of shape \(batch, groups\*in_features, length\), got 2 dims: \(13, 15\)"),
        (torch.randn(2, 15, 3, 4), "conv", r"got 4 dims: \(2, 15, 3, 4\)"),
        (torch.randn(2, 14, 7), "conv", r"dim 1 must be groups\*in_features = 3\*5 = 15, got x of shape \(2, 14, 7\)"),
        (torch.randn(2, 7, 15), "conv", r"dim 1 must be .* = 15, got x of shape \(2, 7, 15\)"),
    ],
)
def test_wrong_x_shape(x, layout, match):
    with pytest.raises(ValueError, match=match):
        grouped_linear(x, W, B, layout=layout)


def test_weight_must_be_3d():
    with pytest.raises(ValueError, match=r"weight_layout='out_in' takes a weight of shape \(groups, out_features, in_features\), got \(12, 5\)"):
        grouped_linear(torch.randn(13, 15), torch.randn(12, 5))
    with pytest.raises(ValueError, match=r"no empty dim, got shape \(3, 0, 5\)"):
        grouped_linear(torch.randn(13, 15), torch.randn(3, 0, 5))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        check_weight([[1.0]], None)


@pytest.mark.parametrize("bias", [torch.randn(13), torch.randn(3, 5), torch.randn(4, 3), torch.randn(3, 4, 1)])
def test_bias_shape_mismatch(bias):
    got = str(tuple(bias.shape)).replace("(", r"\(").replace(")", r"\)")
    expected = (
        r"bias must have shape \(groups, out_features\) = \(3, 4\) or \(groups, 1, out_features\) = \(3, 1, 4\) "
        r"or \(groups\*out_features,\) = \(12,\), got " + got
    )
    with pytest.raises(ValueError, match=expected):
        grouped_linear(torch.randn(13, 15), W, bias)


def test_bias_must_be_a_tensor():
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got float"):
        grouped_linear(torch.randn(13, 15), W, 1.0)


def test_x_must_be_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_input([1.0] * 15, W, None, "last")


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        grouped_linear(torch.randn(13, 15), W.double(), B)
    with pytest.raises(TypeError, match="bias has dtype torch.float16 but x has torch.float32"):
        grouped_linear(torch.randn(13, 15), W, B.half())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_unsupported_dtype_on_cpu_names_it(dtype):
    match = rf"on cpu supports dtype torch.float32, got {dtype}"
    with pytest.raises(TypeError, match=match):
        grouped_linear(torch.randn(13, 15, dtype=dtype), W.to(dtype), B.to(dtype))
    layer = GroupedLinear(3, 5, 4, dtype=dtype)
    with pytest.raises(TypeError, match=match):
        layer(torch.randn(13, 15, dtype=dtype))


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="got torch.int64"):
        grouped_linear(torch.ones(13, 15, dtype=torch.int64), W.long())


def test_device_mismatch():
    meta_w = torch.empty(3, 4, 5, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        grouped_linear(torch.randn(13, 15), meta_w, B)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        grouped_linear(torch.randn(13, 15), W, torch.empty(3, 4, device="meta"))


def test_unsupported_device():
    x = torch.empty(13, 15, device="meta")
    with pytest.raises(ValueError, match="runs on 'cpu' or 'cuda' tensors, got a tensor on 'meta'"):
        check_dtype(x)


@pytest.mark.parametrize("layout", ["nlc", "LAST", "", None])
def test_invalid_layout(layout):
    with pytest.raises(ValueError, match=r"layout must be one of \('last', 'conv', 'ensemble', 'groups_last', 'heads', 'shared', 'shared_last'\), got " + repr(repr(layout))[1:-1]):
        grouped_linear(torch.randn(13, 15), W, B, layout=layout)
    with pytest.raises(ValueError, match="layout must be one of"):
        check_layout(layout)


def test_valid_inputs_pass():
    check_input(torch.randn(2, 13, 15), W, B, "last")
    check_input(torch.randn(2, 15, 7), W, None, "conv")
    assert check_weight(W, B) == (3, 5, 4)
