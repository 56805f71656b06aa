"""The functional form of the grouped linear layer."""

from __future__ import annotations

import torch

from tvmgroup.ops import EagerGroupedLinear, forward, grouped_linear_op
from tvmgroup.validation import check_input

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A call torch does nothing special with: no compiler or export tracing, no function
    transform (vmap, grad), no dispatch or function mode, no tensor subclass. Such calls
    skip custom-op dispatch; all others go through the registered op."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and (bias is None or type(bias) in _PLAIN)
    )


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, layout: str = "last"
) -> torch.Tensor:
    """``y[..., g, :] = x[..., g, :] @ weight[g].T + bias[g]`` for each of G groups.

    Args:
        x: ``(..., G*K)`` for ``layout="last"``, ``(B, G*K, L)`` for ``layout="conv"``.
        weight: ``(G, O, K)``.
        bias: ``(G, O)`` or None.
    Returns:
        ``(..., G*O)`` or ``(B, G*O, L)``.
    """
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # Like nn.Linear under autocast: compute in the autocast dtype (sums stay float32).
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    check_input(x, weight, bias, layout)
    if not _plain_eager(x, weight, bias):
        return grouped_linear_op(x, weight, bias, layout)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return EagerGroupedLinear.apply(x, weight, bias, layout)
    return forward(x, weight, bias, layout)
