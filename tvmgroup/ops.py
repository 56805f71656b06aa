"""The op and its two backward passes: plain implementations, custom ops, eager autograd.

* ``forward``, ``grad_input``, ``grad_weight``: the implementations. They view the user's
  tensors in kernel layout (no copies for contiguous inputs) and call the TVM kernel chosen
  by :func:`tvmgroup.lookup.kernel_for_call`. They do not check their inputs.
* ``tvmgroup::grouped_linear`` and its backward ops: ``torch.library.custom_op`` s with fakes
  and ``register_autograd``, so the op works under ``torch.compile(fullgraph=True)``,
  ``torch.export``, dispatch modes and function transforms.
* :class:`EagerGroupedLinear`: the same autograd as a ``torch.autograd.Function`` on the
  implementations, for plain eager calls, where custom-op dispatch would cost more than a
  small layer's work. :func:`tvmgroup.functional.grouped_linear` picks between the two.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tvmgroup.kernel import Kernel
from tvmgroup.layouts import layout_of
from tvmgroup.lookup import kernel_for_call
from tvmgroup.validation import check_input
from tvmgroup.weights import bias_as_grouped, weight_dims, weight_shape


def _run(op: str, weight: Tensor, layout: str, bias: bool, rows: int, weight_layout: str, *args: Tensor) -> None:
    device = args[0].device
    kernel: Kernel = kernel_for_call(op, weight, layout, bias, device, rows, weight_layout)
    if kernel.launch is None:
        kernel(*args)
        return
    with kernel.launch(device):  # e.g. torch's current CUDA stream
        kernel(*args)


# ---------------------------------------------------------------------------------------------
# implementations


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str, weight_layout: str = "out_in") -> Tensor:
    """y = x @ weight[g].T + bias[g] per group, in the user's layout.

    ``weight`` is stored in ``weight_layout`` (:mod:`tvmgroup.weights`); ``bias`` has any of
    the bias shapes there (the kernel reads a ``(G, O)`` view of it).
    """
    lay = layout_of(layout)
    groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
    y = x.new_empty(lay.out_shape(x, groups, out_features))
    if x.numel() == 0:
        return y
    args = [lay.kernel_view(x, groups, in_features), weight.contiguous()]
    if bias is not None:
        args.append(bias_as_grouped(bias, groups, out_features))
    args.append(lay.kernel_view(y, groups, out_features))
    _run("forward", weight, layout, bias is not None, x.numel() // (groups * in_features), weight_layout, *args)
    return y


def grad_input(grad_y: Tensor, weight: Tensor, layout: str, weight_layout: str = "out_in") -> Tensor:
    """grad_x = grad_y @ weight[g] per group."""
    lay = layout_of(layout)
    groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
    grad_x = grad_y.new_empty(lay.out_shape(grad_y, groups, in_features))
    if grad_y.numel() == 0:
        return grad_x
    dy = lay.kernel_view(grad_y, groups, out_features)
    dx = lay.kernel_view(grad_x, groups, in_features)
    rows = grad_y.numel() // (groups * out_features)
    _run("grad_input", weight, layout, False, rows, weight_layout, dy, weight.contiguous(), dx)
    return grad_x


def grad_weight(
    grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str, weight_layout: str = "out_in"
) -> tuple[Tensor, Tensor]:
    """(grad_weight, grad_bias): sums over rows; grad_bias is empty when ``with_bias`` is False.

    grad_weight is stored as the weight is (``weight_layout``); grad_bias is ``(G, O)``.
    """
    lay = layout_of(layout)
    groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
    grad_w = weight.new_empty(weight_shape(groups, in_features, out_features, weight_layout))
    grad_b = weight.new_empty((groups, out_features) if with_bias else (0,))
    if grad_y.numel() == 0:
        return grad_w.zero_(), grad_b.zero_()
    args = [lay.kernel_view(grad_y, groups, out_features), lay.kernel_view(x, groups, in_features), grad_w]
    if with_bias:
        args.append(grad_b)
    _run("grad_weight", weight, layout, with_bias, grad_y.numel() // (groups * out_features), weight_layout, *args)
    return grad_w, grad_b


def _backward_pass(
    saved, needs_input_grad, layout: str, with_bias: bool, grad_y: Tensor, grad_input_fn, grad_weight_fn,
    weight_layout: str = "out_in", bias_shape: Optional[tuple] = None,
):
    x, weight = saved
    need_x, need_w, need_b = needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = grad_input_fn(grad_y, weight, layout, weight_layout)
    if need_w or need_b:
        gw, gb = grad_weight_fn(grad_y, x, weight, with_bias and need_b, layout, weight_layout)
        grad_w = gw if need_w else None
        grad_b = gb.view(bias_shape) if (need_b and with_bias) else None  # the bias's own shape
    return grad_x, grad_w, grad_b, None, None


# ---------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("tvmgroup::grouped_linear", mutates_args=())
def grouped_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str, weight_layout: str = "out_in"
) -> Tensor:
    """y = x @ weight[g].T + bias[g] per group, in the user's layout (a kernel layout of
    :mod:`tvmgroup.layouts`), the weight stored in ``weight_layout``."""
    check_input(x, weight, bias, layout, weight_layout)
    return forward(x, weight, bias, layout, weight_layout)


@grouped_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str, weight_layout: str = "out_in") -> Tensor:
    check_input(x, weight, bias, layout, weight_layout)
    groups, _, out_features = weight_dims(weight.shape, weight_layout)
    return x.new_empty(layout_of(layout).out_shape(x, groups, out_features))


@torch.library.custom_op("tvmgroup::grouped_linear_grad_input", mutates_args=())
def grad_input_op(grad_y: Tensor, weight: Tensor, layout: str, weight_layout: str = "out_in") -> Tensor:
    return grad_input(grad_y, weight, layout, weight_layout)


@grad_input_op.register_fake
def _(grad_y: Tensor, weight: Tensor, layout: str, weight_layout: str = "out_in") -> Tensor:
    groups, in_features, _ = weight_dims(weight.shape, weight_layout)
    return grad_y.new_empty(layout_of(layout).out_shape(grad_y, groups, in_features))


@torch.library.custom_op("tvmgroup::grouped_linear_grad_weight", mutates_args=())
def grad_weight_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str, weight_layout: str = "out_in"
) -> tuple[Tensor, Tensor]:
    """Returns (grad_weight, grad_bias); grad_bias is empty when ``with_bias`` is False."""
    return grad_weight(grad_y, x, weight, with_bias, layout, weight_layout)


@grad_weight_op.register_fake
def _(
    grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str, weight_layout: str = "out_in"
) -> tuple[Tensor, Tensor]:
    groups, _, out_features = weight_dims(weight.shape, weight_layout)
    return weight.new_empty(weight.shape), weight.new_empty((groups, out_features) if with_bias else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, layout, *rest = inputs
    ctx.layout = layout
    ctx.weight_layout = rest[0] if rest else "out_in"
    ctx.with_bias = bias is not None
    ctx.bias_shape = tuple(bias.shape) if bias is not None else None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_y: Tensor):
    return _backward_pass(
        ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.with_bias, grad_y, grad_input_op, grad_weight_op,
        ctx.weight_layout, ctx.bias_shape,
    )


grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# eager autograd


class EagerGroupedLinear(torch.autograd.Function):
    """The op's autograd for eager calls: the implementations, without op dispatch.

    Besides the backward it has a forward-mode rule (``jvp``: the op is linear in x and in
    (weight, bias)) and a ``vmap`` rule, so ``torch.func`` transforms and
    ``torch.autograd.forward_ad`` work on it.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str, weight_layout: str = "out_in") -> Tensor:
        return forward(x, weight, bias, layout, weight_layout)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _setup_context(ctx, inputs, output)
        x, weight, *_ = inputs
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        # With create_graph=True (and under torch.func.grad) the backward itself is recorded:
        # go through Functions whose own backward raises, so differentiating again is a clear
        # error, never a silently dropped term.
        recorded = torch.is_grad_enabled()
        return _backward_pass(
            ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.with_bias, grad_y,
            _GradInput.apply if recorded else grad_input, _GradWeight.apply if recorded else grad_weight,
            ctx.weight_layout, ctx.bias_shape,
        )

    @staticmethod
    def jvp(
        ctx, x_t: Optional[Tensor], weight_t: Optional[Tensor], bias_t: Optional[Tensor], _layout_t, _weight_layout_t=None
    ) -> Tensor:
        """d(x W^T + b) = dx W^T + x dW^T + db (the op itself, applied to the tangents;
        through ``apply``, since under torch.func the tangents are wrapped tensors)."""
        x, weight = ctx.saved_tensors
        op = EagerGroupedLinear.apply
        layouts = (ctx.layout, ctx.weight_layout)
        terms = []
        if x_t is not None:
            terms.append(op(x_t, weight, bias_t, *layouts))
            bias_t = None
        if weight_t is not None:
            terms.append(op(x, weight_t, bias_t, *layouts))
            bias_t = None
        if bias_t is not None:
            terms.append(op(torch.zeros_like(x), weight, bias_t, *layouts))
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    @staticmethod
    def vmap(
        info, in_dims, x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str, weight_layout: str = "out_in"
    ):
        return _vmap_rows_or_members(EagerGroupedLinear.apply, info, in_dims, (x, weight, bias, layout, weight_layout))


def _vmap_rows_or_members(apply, info, in_dims, args: tuple):
    """A vmap rule for an op whose first argument is row-indexed and whose last two are the
    layout and the weight layout.

    A batch over that argument alone joins its rows (one call, outputs row-indexed); any
    other batch (over parameters: ensembles of layers) runs one call per member.
    """
    first, *rest = args
    layout = args[-2]
    if all(d is None for d in in_dims[1:]):
        first = first.movedim(in_dims[0], 0)
        batch = first.shape[0]
        if layout_of(layout).rows_innermost:  # (V, B, F, L): V joins B
            out = apply(first.reshape(-1, *first.shape[2:]), *rest)
            return out.reshape(batch, -1, *out.shape[1:]), 0
        if layout_of(layout).row_axis == 1:  # (V, G, ..., F): V joins the rows after G
            return apply(first.movedim(0, 1), *rest).movedim(1, 0), 0
        return apply(first, *rest), 0

    return torch.stack(_per_member(apply, info, in_dims, args)), 0


def _per_member(apply, info, in_dims, args: tuple) -> list:
    """``apply`` once per member of a vmap batch, each call on that member's slices."""

    def member(t, dim, i):
        return t if dim is None or not isinstance(t, Tensor) else t.select(dim, i)

    return [apply(*(member(t, d, i) for t, d in zip(args, in_dims))) for i in range(info.batch_size)]


def _no_double_backward(*_):
    raise RuntimeError(
        "tvmgroup: gradients of gradients (double backward) are not supported; the first "
        "backward pass works, differentiating its result does not"
    )


class _InRecordedBackward(torch.autograd.Function):
    """A backward op inside a recorded backward pass (create_graph=True, torch.func.grad):
    differentiating it raises instead of dropping the term."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    backward = staticmethod(_no_double_backward)


class _GradInput(_InRecordedBackward):
    forward = staticmethod(grad_input)

    @staticmethod
    def vmap(info, in_dims, grad_y: Tensor, weight: Tensor, layout: str, weight_layout: str = "out_in"):
        return _vmap_rows_or_members(_GradInput.apply, info, in_dims, (grad_y, weight, layout, weight_layout))


class _GradWeight(_InRecordedBackward):
    forward = staticmethod(grad_weight)

    @staticmethod
    def vmap(
        info, in_dims, grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str,
        weight_layout: str = "out_in",
    ):
        # Sums over rows differ per member: one call each (joining the members' rows would
        # add their sums together).
        outs = _per_member(_GradWeight.apply, info, in_dims, (grad_y, x, weight, with_bias, layout, weight_layout))
        return tuple(torch.stack(parts) for parts in zip(*outs)), (0, 0)


__all__ = ["grouped_linear_op", "grad_input_op", "grad_weight_op", "EagerGroupedLinear", "forward", "grad_input", "grad_weight"]
