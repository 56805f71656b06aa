"""The PyTorch custom ops ``tvmgroup::grouped_linear`` and its two backward ops.

Registered with ``torch.library.custom_op``, a fake (meta) implementation for each, and
``register_autograd``, so the op works under autograd, ``torch.compile(fullgraph=True)`` and
``torch.export``. The implementations reshape the user's tensors into kernel layout with
views (no copies for contiguous inputs) and call the TVM kernel chosen by
:mod:`tvmgroup.lookup`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tvmgroup.compute import OpSpec
from tvmgroup.layouts import layout_of
from tvmgroup.lookup import kernel_for
from tvmgroup.target import family_for_device
from tvmgroup.validation import check_input


def _spec(op: str, weight: Tensor, layout: str, bias: bool) -> OpSpec:
    groups, out_features, in_features = weight.shape
    return OpSpec(op, groups, in_features, out_features, str(weight.dtype).removeprefix("torch."), layout, bias)


def _run(op: str, weight: Tensor, layout: str, bias: bool, device: torch.device, *args: Tensor) -> None:
    family = family_for_device(device.type)
    kernel = kernel_for(_spec(op, weight, layout, bias), family.make_target(None))
    if family.launch is None:
        kernel(*args)
        return
    with family.launch(device):  # e.g. torch's current CUDA stream
        kernel(*args)


# ---------------------------------------------------------------------------------------------
# forward


@torch.library.custom_op("tvmgroup::grouped_linear", mutates_args=())
def grouped_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str) -> Tensor:
    """y = x @ weight[g].T + bias[g] per group, in the user's layout ("last" or "conv")."""
    check_input(x, weight, bias, layout)
    lay = layout_of(layout)
    groups, out_features, in_features = weight.shape
    y = x.new_empty(lay.out_shape(x, groups, out_features))
    if x.numel() == 0:
        return y
    args = [lay.kernel_view(x, groups, in_features), weight.contiguous()]
    if bias is not None:
        args.append(bias.contiguous())
    args.append(lay.kernel_view(y, groups, out_features))
    _run("forward", weight, layout, bias is not None, x.device, *args)
    return y


@grouped_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str) -> Tensor:
    check_input(x, weight, bias, layout)
    return x.new_empty(layout_of(layout).out_shape(x, weight.shape[0], weight.shape[1]))


# ---------------------------------------------------------------------------------------------
# backward: grad_x = grad_y @ weight[g] and (grad_weight, grad_bias) = sums over rows


@torch.library.custom_op("tvmgroup::grouped_linear_grad_input", mutates_args=())
def grad_input_op(grad_y: Tensor, weight: Tensor, layout: str) -> Tensor:
    lay = layout_of(layout)
    groups, out_features, in_features = weight.shape
    grad_x = grad_y.new_empty(lay.out_shape(grad_y, groups, in_features))
    if grad_y.numel() == 0:
        return grad_x
    dy = lay.kernel_view(grad_y, groups, out_features)
    dx = lay.kernel_view(grad_x, groups, in_features)
    _run("grad_input", weight, layout, False, grad_y.device, dy, weight.contiguous(), dx)
    return grad_x


@grad_input_op.register_fake
def _(grad_y: Tensor, weight: Tensor, layout: str) -> Tensor:
    return grad_y.new_empty(layout_of(layout).out_shape(grad_y, weight.shape[0], weight.shape[2]))


@torch.library.custom_op("tvmgroup::grouped_linear_grad_weight", mutates_args=())
def grad_weight_op(grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str) -> tuple[Tensor, Tensor]:
    """Returns (grad_weight, grad_bias); grad_bias is empty when ``with_bias`` is False."""
    lay = layout_of(layout)
    groups, out_features, in_features = weight.shape
    grad_w = weight.new_empty(weight.shape)
    grad_b = weight.new_empty((groups, out_features) if with_bias else (0,))
    if grad_y.numel() == 0:
        return grad_w.zero_(), grad_b.zero_()
    args = [lay.kernel_view(grad_y, groups, out_features), lay.kernel_view(x, groups, in_features), grad_w]
    if with_bias:
        args.append(grad_b)
    _run("grad_weight", weight, layout, with_bias, x.device, *args)
    return grad_w, grad_b


@grad_weight_op.register_fake
def _(grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str) -> tuple[Tensor, Tensor]:
    groups, out_features, _ = weight.shape
    return weight.new_empty(weight.shape), weight.new_empty((groups, out_features) if with_bias else (0,))


# ---------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, layout = inputs
    ctx.layout = layout
    ctx.with_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_y: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = grad_input_op(grad_y, weight, ctx.layout)
    if need_w or need_b:
        gw, gb = grad_weight_op(grad_y, x, weight, ctx.with_bias and need_b, ctx.layout)
        grad_w = gw if need_w else None
        grad_b = gb if (need_b and ctx.with_bias) else None
    return grad_x, grad_w, grad_b, None


grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["grouped_linear_op", "grad_input_op", "grad_weight_op"]
