"""The functional form of the grouped linear layer."""

from __future__ import annotations

import torch

from tvmgroup.layouts import SHARED_INPUTS
from tvmgroup.ops import EagerBackward, EagerGroupedLinear, forward, grouped_linear_op
from tvmgroup.validation import check_input, check_layout, check_shared_input, check_weight

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """An eager call: no compiler or export tracing, no dispatch or function mode, no tensor
    subclass. Such calls (function transforms and forward-mode AD included) run
    :class:`~tvmgroup.ops.EagerGroupedLinear`; all others go through the registered op."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and (bias is None or type(bias) in _PLAIN)
    )


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    layout: str = "last",
    weight_layout: str = "out_in",
) -> torch.Tensor:
    """``y[..., g, :] = x[..., g, :] @ weight[g].T + bias[g]`` for each of G groups.

    Args:
        x: ``(..., G*K)`` for ``layout="last"``, ``(B, G*K, L)`` for ``layout="conv"``,
            ``(G, ..., K)`` for ``layout="ensemble"``, ``(..., K, G)`` (groups contiguous,
            e.g. one head per channel of a ``(B, L, C)`` series) for ``layout="groups_last"``,
            ``(..., G, K)`` (any strides, features contiguous) for ``layout="heads"``,
            ``(..., K)`` (one input read by every group) for ``layout="shared"`` and
            ``"shared_last"``.
        weight: ``(G, O, K)`` for ``weight_layout="out_in"``, ``(G, K, O)`` for ``"in_out"``
            (then ``y = x @ weight[g] + bias[g]``); read as stored.
        bias: ``(G, O)``, ``(G, 1, O)``, ``(G*O,)`` or None; its gradient has its shape.
    Returns:
        ``(..., G*O)`` (``"last"``, ``"shared_last"``), ``(B, G*O, L)``, ``(G, ..., O)``
        (``"ensemble"``, ``"shared"``), ``(..., O, G)`` (``"groups_last"``) or ``(..., G, O)``
        (``"heads"``).
    """
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # Like nn.Linear under autocast: compute in the autocast dtype (sums stay float32).
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    check_layout(layout)
    shared = SHARED_INPUTS.get(layout)
    if shared is not None:
        # The kernels of its kernel layout on the input expanded over the groups: a stride-0
        # view they read in place; the expand's own backward sums grad_x over the groups.
        groups, in_features, _ = check_weight(weight, bias, weight_layout)
        check_shared_input(x, in_features, layout)
        x, layout = shared.expand(x, groups), shared.kernel_layout
        return shared.output(_grouped_linear(x, weight, bias, layout, weight_layout))
    return _grouped_linear(x, weight, bias, layout, weight_layout)


def _grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str, weight_layout: str
) -> torch.Tensor:
    """A call in a kernel layout: the registered op, or its eager forms."""
    check_input(x, weight, bias, layout, weight_layout)
    if not _eager(x, weight, bias):
        return grouped_linear_op(x, weight, bias, layout, weight_layout)
    transformed = _transformed()
    if not transformed and not _needs_grad(x, weight, bias):
        return forward(x, weight, bias, layout, weight_layout)
    if not transformed:
        return EagerBackward.apply(x, weight, bias, layout, weight_layout)
    return EagerGroupedLinear.apply(x, weight, bias, layout, weight_layout)


def _transformed() -> bool:
    """A function transform (``torch.func``) or forward-mode AD is active: they need
    :class:`~tvmgroup.ops.EagerGroupedLinear`'s ``jvp`` and ``vmap`` rules."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Autograd records the call: grad mode is on and an argument requires a gradient."""
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
