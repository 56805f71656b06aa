"""The op and its backward passes: plain implementations, custom ops, eager autograd.

* ``forward``, ``grad_input``, ``grad_weight``, ``backward`` (the last two in one kernel,
  where the device's template has it: :func:`fuses_backward`): the implementations. They
  view the user's tensors in kernel layout (no copies for contiguous inputs) and call the
  TVM kernel chosen by :func:`tvmgroup.lookup.kernel_for_call`. They do not check their
  inputs.
* ``tvmgroup::grouped_linear`` and its backward ops: ``torch.library.custom_op`` s with fakes
  and ``register_autograd``, so the op works under ``torch.compile(fullgraph=True)``,
  ``torch.export``, dispatch modes and function transforms. The backward ops have autograd
  too (their derivatives are calls of the same three ops), so gradients of gradients work.
  The backward of the op runs ``tvmgroup::grouped_linear_backward`` (one kernel) where x
  and the weight or bias need gradients and :func:`fuses_backward` says so.
* :class:`EagerGroupedLinear`: the same autograd as a ``torch.autograd.Function`` on the
  implementations, for plain eager calls, where custom-op dispatch would cost more than a
  small layer's work. :func:`tvmgroup.functional.grouped_linear` picks between the two.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from tvmgroup.kernel import BUFFER_ALIGNMENT, Kernel
from tvmgroup.layouts import layout_of
from tvmgroup.lookup import kernel_for_call
from tvmgroup.target import family_for_device
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


# TVM compiles every buffer as aligned (``BUFFER_ALIGNMENT``) and may use aligned vector loads
# on it. A view into the middle of a tensor (a slice of stacked weights, e.g. one member under
# ``vmap``) can start anywhere: such inputs run on a copy.
_ALIGNMENT = BUFFER_ALIGNMENT


def _aligned(t: Tensor) -> Tensor:
    return t if t.data_ptr() % _ALIGNMENT == 0 else t.clone()


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
    args = [_aligned(lay.kernel_view(x, groups, in_features)), _aligned(weight.contiguous())]
    if bias is not None:
        args.append(_aligned(bias_as_grouped(bias, groups, out_features)))
    args.append(lay.kernel_view(y, groups, out_features))
    rows = x.numel() // (groups * in_features)
    _run("forward", weight, layout, bias is not None, rows, weight_layout, *args)
    return y


def grad_input(grad_y: Tensor, weight: Tensor, layout: str, weight_layout: str = "out_in") -> Tensor:
    """grad_x = grad_y @ weight[g] per group (``weight`` stored in ``weight_layout``)."""
    lay = layout_of(layout)
    groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
    grad_x = grad_y.new_empty(lay.out_shape(grad_y, groups, in_features))
    if grad_y.numel() == 0:
        return grad_x
    dy = _aligned(lay.kernel_view(grad_y, groups, out_features))
    dx = lay.kernel_view(grad_x, groups, in_features)
    rows = grad_y.numel() // (groups * out_features)
    _run("grad_input", weight, layout, False, rows, weight_layout, dy, _aligned(weight.contiguous()), dx)
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
    args = [
        _aligned(lay.kernel_view(grad_y, groups, out_features)), _aligned(lay.kernel_view(x, groups, in_features)), grad_w
    ]
    if with_bias:
        args.append(grad_b)
    rows = grad_y.numel() // (groups * out_features)
    _run("grad_weight", weight, layout, with_bias, rows, weight_layout, *args)
    return grad_w, grad_b


def backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str, weight_layout: str = "out_in"
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) in one kernel call: :func:`grad_input` and
    :func:`grad_weight` fused (one lookup, one launch), grad_y read by both. grad_bias is
    empty when ``with_bias`` is False. Only where :func:`fuses_backward` says so."""
    lay = layout_of(layout)
    groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
    grad_x = grad_y.new_empty(lay.out_shape(grad_y, groups, in_features))
    grad_w = weight.new_empty(weight_shape(groups, in_features, out_features, weight_layout))
    grad_b = weight.new_empty((groups, out_features) if with_bias else (0,))
    if grad_y.numel() == 0:
        return grad_x, grad_w.zero_(), grad_b.zero_()
    args = [
        _aligned(lay.kernel_view(grad_y, groups, out_features)), _aligned(lay.kernel_view(x, groups, in_features)),
        _aligned(weight.contiguous()), lay.kernel_view(grad_x, groups, in_features), grad_w,
    ]
    if with_bias:
        args.append(grad_b)
    rows = grad_y.numel() // (groups * out_features)
    _run("backward", weight, layout, with_bias, rows, weight_layout, *args)
    return grad_x, grad_w, grad_b


# Whether backward passes may run the fused op; False runs grad_input and grad_weight (set
# TVMGROUP_FUSED_BACKWARD=0 before import, or this flag, to compare the two).
FUSED_BACKWARD = os.environ.get("TVMGROUP_FUSED_BACKWARD", "1") != "0"
_fuses: dict[tuple[str, str], bool] = {}


def fuses_backward(device_type: str, layout: str) -> bool:
    """Whether a backward pass on ``device_type`` tensors in kernel layout ``layout`` runs the
    fused op: the device's template schedules it on that layout (the CPU template on the
    layouts it names; not CUDA), and :data:`FUSED_BACKWARD` is on."""
    fuses = _fuses.get((device_type, layout))
    if fuses is None:
        fuses = family_for_device(device_type).supports("backward", layout)
        _fuses[(device_type, layout)] = fuses
    return fuses and FUSED_BACKWARD


def _backward_pass(
    saved, needs_input_grad, layout: str, with_bias: bool, grad_y: Tensor, grad_input_fn, grad_weight_fn,
    weight_layout: str = "out_in", bias_shape: Optional[tuple] = None, backward_fn=None,
):
    """The gradients of x, weight and bias: one fused call (``backward_fn``) where x and the
    weight or bias all need one and the device and layout have it, else grad_input and
    grad_weight as needed."""
    x, weight = saved
    need_x, need_w, need_b = needs_input_grad[:3]
    need_b = need_b and with_bias
    grad_x = grad_w = grad_b = None
    if need_x and (need_w or need_b) and backward_fn is not None and fuses_backward(grad_y.device.type, layout):
        grad_x, gw, gb = backward_fn(grad_y, x, weight, need_b, layout, weight_layout)
    else:
        if need_x:
            grad_x = grad_input_fn(grad_y, weight, layout, weight_layout)
        if need_w or need_b:
            gw, gb = grad_weight_fn(grad_y, x, weight, need_b, layout, weight_layout)
    if need_w or need_b:
        grad_w = gw if need_w else None
        grad_b = gb.view(bias_shape) if need_b else None  # the bias's own shape
    return grad_x, grad_w, grad_b, None, None


# The backward ops are bilinear too, so their derivatives are calls of the same three kernels.
# Per group, with rows n (B and L for "conv"), W read as (O, K) whatever its storage:
#   grad_x[n,k]  = sum_o grad_y[n,o] W[o,k]               (grad_input)
#   grad_W[o,k]  = sum_n grad_y[n,o] x[n,k],  grad_b[o] = sum_n grad_y[n,o]   (grad_weight)
# Each call passes the weight convention on: an upstream shaped like the weight is stored as
# the weight is (grad_weight returns it so), so it is read in the same convention.


def _grad_input_backward(
    saved, needs_input_grad, layout: str, weight_layout: str, v: Tensor, forward_fn, grad_weight_fn
):
    """Gradients of grad_x = grad_input(grad_y, W) for an upstream ``v`` shaped like x:
    dL/dgrad_y = v @ W[g].T (the forward op, no bias) and
    dL/dW[g] = sum over rows of grad_y[g]^T v[g] (grad_weight, grad_y upstream and v as input),
    stored in ``weight_layout`` as W is."""
    grad_y, weight = saved
    need_grad_y, need_w = needs_input_grad[:2]
    d_grad_y = forward_fn(v, weight, None, layout, weight_layout) if need_grad_y else None
    d_w = grad_weight_fn(grad_y, v, weight, False, layout, weight_layout)[0] if need_w else None
    return d_grad_y, d_w, None, None


def _grad_weight_backward(
    saved, needs_input_grad, layout: str, weight_layout: str, with_bias: bool, u: Optional[Tensor],
    c: Optional[Tensor], forward_fn, grad_input_fn,
):
    """Gradients of (grad_W, grad_b) = grad_weight(grad_y, x) for upstreams ``u`` (like grad_W:
    stored in ``weight_layout``) and ``c`` (like grad_b, ``(G, O)``):
    dL/dgrad_y = x @ u[g].T + c[g] (the forward op, u as weight, c as bias) and
    dL/dx = grad_y @ u[g] (grad_input, u as weight). The weight argument only gives shapes."""
    grad_y, x, weight = saved
    need_grad_y, need_x = needs_input_grad[:2]
    c = c if with_bias else None
    if u is None and c is None:
        return None, None, None, None, None, None
    d_grad_y = d_x = None
    if need_grad_y:
        d_grad_y = forward_fn(x, u if u is not None else torch.zeros_like(weight), c, layout, weight_layout)
    if need_x and u is not None:
        d_x = grad_input_fn(grad_y, u, layout, weight_layout)
    return d_grad_y, d_x, None, None, None, None


def _fused_backward_backward(
    saved, needs_input_grad, layout: str, weight_layout: str, with_bias: bool, v: Optional[Tensor],
    u: Optional[Tensor], c: Optional[Tensor], forward_fn, grad_input_fn, grad_weight_fn,
):
    """Gradients of (grad_x, grad_W, grad_b) = backward(grad_y, x, W) for upstreams ``v``
    (like grad_x), ``u`` (like grad_W) and ``c`` (like grad_b): the sums of grad_input's and
    grad_weight's (see :func:`_grad_input_backward`, :func:`_grad_weight_backward`)."""
    grad_y, x, weight = saved
    need_grad_y, need_x, need_w = needs_input_grad[:3]
    d_grad_y = []
    d_x = d_w = None
    if v is not None:
        dgy, d_w, _, _ = _grad_input_backward(
            (grad_y, weight), (need_grad_y, need_w), layout, weight_layout, v, forward_fn, grad_weight_fn
        )
        d_grad_y.append(dgy)
    dgy, d_x, *_ = _grad_weight_backward(
        (grad_y, x, weight), (need_grad_y, need_x), layout, weight_layout, with_bias, u, c, forward_fn, grad_input_fn
    )
    d_grad_y.append(dgy)
    d_grad_y = [t for t in d_grad_y if t is not None]
    return (_sum(d_grad_y) if d_grad_y else None), d_x, d_w, None, None, None


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


@torch.library.custom_op("tvmgroup::grouped_linear_backward", mutates_args=())
def backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str, weight_layout: str = "out_in"
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias) from one kernel; grad_bias is empty when
    ``with_bias`` is False. Only for devices and layouts :func:`fuses_backward` names."""
    return backward(grad_y, x, weight, with_bias, layout, weight_layout)


@backward_op.register_fake
def _(
    grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str, weight_layout: str = "out_in"
) -> tuple[Tensor, Tensor, Tensor]:
    groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
    grad_x = grad_y.new_empty(layout_of(layout).out_shape(grad_y, groups, in_features))
    return grad_x, weight.new_empty(weight.shape), weight.new_empty((groups, out_features) if with_bias else (0,))


def _weight_layout_of(rest: list) -> str:
    """The trailing ``weight_layout`` argument of a call's inputs (absent: the default)."""
    return rest[0] if rest else "out_in"


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, layout, *rest = inputs
    ctx.layout = layout
    ctx.weight_layout = _weight_layout_of(rest)
    ctx.with_bias = bias is not None
    ctx.bias_shape = tuple(bias.shape) if bias is not None else None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_y: Tensor):
    return _backward_pass(
        ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.with_bias, grad_y, grad_input_op, grad_weight_op,
        ctx.weight_layout, ctx.bias_shape, backward_op,
    )


grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _grad_input_setup_context(ctx, inputs, output) -> None:
    grad_y, weight, layout, *rest = inputs
    ctx.layout = layout
    ctx.weight_layout = _weight_layout_of(rest)
    ctx.save_for_backward(grad_y, weight)


def _grad_input_op_backward(ctx, v: Tensor):
    return _grad_input_backward(
        ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.weight_layout, v, grouped_linear_op, grad_weight_op
    )


grad_input_op.register_autograd(_grad_input_op_backward, setup_context=_grad_input_setup_context)


def _grad_weight_setup_context(ctx, inputs, output) -> None:
    grad_y, x, weight, with_bias, layout, *rest = inputs
    ctx.layout, ctx.with_bias = layout, with_bias
    ctx.weight_layout = _weight_layout_of(rest)
    ctx.save_for_backward(grad_y, x, weight)


def _grad_weight_op_backward(ctx, u: Optional[Tensor], c: Optional[Tensor]):
    return _grad_weight_backward(
        ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.weight_layout, ctx.with_bias, u, c,
        grouped_linear_op, grad_input_op,
    )


grad_weight_op.register_autograd(_grad_weight_op_backward, setup_context=_grad_weight_setup_context)


def _backward_op_backward(ctx, v: Optional[Tensor], u: Optional[Tensor], c: Optional[Tensor]):
    return _fused_backward_backward(
        ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.weight_layout, ctx.with_bias, v, u, c,
        grouped_linear_op, grad_input_op, grad_weight_op,
    )


# The same context as grad_weight's: (grad_y, x, weight), the layouts and with_bias.
backward_op.register_autograd(_backward_op_backward, setup_context=_grad_weight_setup_context)


# ---------------------------------------------------------------------------------------------
# eager autograd


class EagerGroupedLinear(torch.autograd.Function):
    """The op's autograd for eager calls: the implementations, without op dispatch.

    Besides the backward it has a forward-mode rule (``jvp``: the op is linear in x and in
    (weight, bias)) and a ``vmap`` rule, so ``torch.func`` transforms and
    ``torch.autograd.forward_ad`` work on it. A recorded backward pass runs through
    :class:`_GradInput` and :class:`_GradWeight`, which are differentiable again.
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
        _, grad_input_fn, grad_weight_fn = _backward_fns(grad_y)
        return _backward_pass(
            ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.with_bias, grad_y, grad_input_fn, grad_weight_fn,
            ctx.weight_layout, ctx.bias_shape, _fused_backward_fn(grad_y),
        )

    @staticmethod
    def jvp(
        ctx, x_t: Optional[Tensor], weight_t: Optional[Tensor], bias_t: Optional[Tensor], _layout_t, _weight_layout_t=None
    ) -> Tensor:
        """d(x W^T + b) = dx W^T + x dW^T + db (the op itself, applied to the tangents;
        through ``apply``, since under torch.func the tangents are wrapped tensors). The
        weight's tangent is stored as the weight is, the bias's shaped as the bias."""
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
        return _sum(terms)

    @staticmethod
    def vmap(
        info, in_dims, x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str, weight_layout: str = "out_in"
    ):
        return _vmap_rows_or_members(EagerGroupedLinear.apply, info, in_dims, (x, weight, bias, layout, weight_layout))


class EagerBackward(torch.autograd.Function):
    """:class:`EagerGroupedLinear` for calls under no function transform or forward-mode AD
    (most training calls): the same backward, in the combined ``forward(ctx, ...)`` form.

    ``Function.apply`` binds the arguments through ``inspect.signature`` for Functions with
    a separate ``setup_context`` (which ``vmap`` rules need), about 20 us a call: as much as
    a small layer's kernels. Its backward is :class:`EagerGroupedLinear`'s (differentiable
    again while recorded).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str, weight_layout: str) -> Tensor:
        _setup_context(ctx, (x, weight, bias, layout, weight_layout), None)
        return forward(x, weight, bias, layout, weight_layout)

    backward = staticmethod(EagerGroupedLinear.backward)


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


def _recording() -> bool:
    """Whether a backward pass is itself recorded (``create_graph=True``, ``torch.func``
    transforms, double backward): then its ops must be differentiable Functions."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


def _backward_fns(*upstream: Optional[Tensor]):
    """(forward, grad_input, grad_weight) for use inside a backward pass: the differentiable
    Functions while the pass is recorded, the bare implementations otherwise. Upstream
    gradients batched by ``torch.autograd.grad(..., is_grads_batched=True)`` (legacy batched
    tensors, which have no storage) go through the registered ops (differentiable too), which
    PyTorch runs once per batch member."""
    if any(t is not None and torch._C._functorch.is_legacy_batchedtensor(t) for t in upstream):
        return grouped_linear_op, grad_input_op, grad_weight_op
    if _recording():
        return EagerGroupedLinear.apply, _GradInput.apply, _GradWeight.apply
    return forward, grad_input, grad_weight


def _fused_backward_fn(grad_y: Tensor):
    """The fused backward for :func:`_backward_pass`: the implementation while the pass is
    not recorded, the registered op (differentiable) for legacy batched upstreams; None
    (grad_input and grad_weight, whose Functions have jvp and vmap rules) while recorded."""
    if torch._C._functorch.is_legacy_batchedtensor(grad_y):
        return backward_op
    if _recording():
        return None
    return backward


def _sum(terms: list):
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


class _GradInput(torch.autograd.Function):
    """grad_input in the eager path: differentiable again (backward, jvp, vmap), so gradients
    of gradients, ``jacfwd(jacrev(...))`` and Hessian-vector products work."""

    @staticmethod
    def forward(grad_y: Tensor, weight: Tensor, layout: str, weight_layout: str = "out_in") -> Tensor:
        return grad_input(grad_y, weight, layout, weight_layout)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _grad_input_setup_context(ctx, inputs, output)
        grad_y, weight, *_ = inputs
        ctx.save_for_forward(grad_y, weight)

    @staticmethod
    def backward(ctx, v: Tensor):
        forward_fn, _, grad_weight_fn = _backward_fns(v)
        return _grad_input_backward(
            ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.weight_layout, v, forward_fn, grad_weight_fn
        )

    @staticmethod
    def jvp(ctx, grad_y_t: Optional[Tensor], weight_t: Optional[Tensor], _layout_t, _weight_layout_t=None) -> Tensor:
        """d(grad_y W) = d(grad_y) W + grad_y dW (dW stored as W is)."""
        grad_y, weight = ctx.saved_tensors
        layouts = (ctx.layout, ctx.weight_layout)
        terms = []
        if grad_y_t is not None:
            terms.append(_GradInput.apply(grad_y_t, weight, *layouts))
        if weight_t is not None:
            terms.append(_GradInput.apply(grad_y, weight_t, *layouts))
        return _sum(terms)

    @staticmethod
    def vmap(info, in_dims, grad_y: Tensor, weight: Tensor, layout: str, weight_layout: str = "out_in"):
        return _vmap_rows_or_members(_GradInput.apply, info, in_dims, (grad_y, weight, layout, weight_layout))


class _GradWeight(torch.autograd.Function):
    """grad_weight in the eager path, differentiable again like :class:`_GradInput`."""

    @staticmethod
    def forward(
        grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str, weight_layout: str = "out_in"
    ) -> tuple[Tensor, Tensor]:
        return grad_weight(grad_y, x, weight, with_bias, layout, weight_layout)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _grad_weight_setup_context(ctx, inputs, output)
        grad_y, x, weight, *_ = inputs
        ctx.save_for_forward(grad_y, x, weight)

    @staticmethod
    def backward(ctx, u: Tensor, c: Tensor):
        forward_fn, grad_input_fn, _ = _backward_fns(u, c)
        return _grad_weight_backward(
            ctx.saved_tensors, ctx.needs_input_grad, ctx.layout, ctx.weight_layout, ctx.with_bias, u, c,
            forward_fn, grad_input_fn,
        )

    @staticmethod
    def jvp(
        ctx, grad_y_t: Optional[Tensor], x_t: Optional[Tensor], _weight_t, _with_bias_t, _layout_t,
        _weight_layout_t=None,
    ):
        """d(grad_W) = grad_weight(d grad_y, x) + grad_weight(grad_y, dx);
        d(grad_b) = sum over rows of d grad_y (the first call's bias part)."""
        grad_y, x, weight = ctx.saved_tensors
        groups, _, out_features = weight_dims(weight.shape, ctx.weight_layout)
        layouts = (ctx.layout, ctx.weight_layout)
        terms, grad_b_t = [], None
        if grad_y_t is not None:
            grad_w_t, grad_b_t = _GradWeight.apply(grad_y_t, x, weight, ctx.with_bias, *layouts)
            terms.append(grad_w_t)
        if x_t is not None:
            terms.append(_GradWeight.apply(grad_y, x_t, weight, False, *layouts)[0])
        if grad_b_t is None:
            grad_b_t = weight.new_zeros((groups, out_features) if ctx.with_bias else (0,))
        return _sum(terms), grad_b_t

    @staticmethod
    def vmap(
        info, in_dims, grad_y: Tensor, x: Tensor, weight: Tensor, with_bias: bool, layout: str,
        weight_layout: str = "out_in",
    ):
        # Sums over rows differ per member: one call each (joining the members' rows would
        # add their sums together).
        outs = _per_member(_GradWeight.apply, info, in_dims, (grad_y, x, weight, with_bias, layout, weight_layout))
        return tuple(torch.stack(parts) for parts in zip(*outs)), (0, 0)


__all__ = [
    "grouped_linear_op", "grad_input_op", "grad_weight_op", "backward_op", "EagerGroupedLinear", "EagerBackward",
    "forward", "grad_input", "grad_weight", "backward", "fuses_backward", "FUSED_BACKWARD",
]
