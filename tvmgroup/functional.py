"""The functional form of the grouped linear layer."""

from __future__ import annotations

import torch

from tvmgroup.ops import grouped_linear_op
from tvmgroup.validation import check_input


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
    return grouped_linear_op(x, weight, bias, layout)
