"""How a weight and a bias are stored, and their views as the kernels read them.

The kernels read the weight as it is stored, in one of two conventions
(:data:`WEIGHT_LAYOUTS`), part of every kernel's key:

* ``"out_in"``: ``(G, O, K)``, each group an ``nn.Linear(K, O).weight`` (the default);
* ``"in_out"``: ``(G, K, O)``, as ensembles of RL agents keep it (``x @ W[e]``).

A bias is ``(G, O)``, ``(G, 1, O)`` (broadcasting against ``(G, B, O)``) or ``(G*O,)``
(``nn.Conv1d``'s); all three are the same memory, so the kernels take a ``(G, O)`` view of
any of them (:func:`bias_as_grouped`), never a copy of a contiguous one.
"""

from __future__ import annotations

import torch

WEIGHT_LAYOUTS: dict[str, str] = {
    "out_in": "(groups, out_features, in_features)",
    "in_out": "(groups, in_features, out_features)",
}
BIAS_LAYOUTS: dict[str, str] = {
    "grouped": "(groups, out_features)",
    "broadcast": "(groups, 1, out_features)",
    "flat": "(groups*out_features,)",
}


def check_weight_layout(weight_layout: str) -> None:
    if not isinstance(weight_layout, str) or weight_layout not in WEIGHT_LAYOUTS:
        choices = ", ".join(f"{name!r} {dims}" for name, dims in WEIGHT_LAYOUTS.items())
        raise ValueError(f"weight_layout must be one of {choices}; got {weight_layout!r}")


def check_bias_layout(bias_layout: str) -> None:
    if not isinstance(bias_layout, str) or bias_layout not in BIAS_LAYOUTS:
        choices = ", ".join(f"{name!r} {dims}" for name, dims in BIAS_LAYOUTS.items())
        raise ValueError(f"bias_layout must be one of {choices}; got {bias_layout!r}")


def weight_shape(groups: int, in_features: int, out_features: int, weight_layout: str) -> tuple[int, int, int]:
    """The stored shape of a weight in ``weight_layout``."""
    if weight_layout == "out_in":
        return (groups, out_features, in_features)
    return (groups, in_features, out_features)


def weight_dims(shape, weight_layout: str) -> tuple[int, int, int]:
    """(groups, in_features, out_features) of a stored weight's ``shape``."""
    groups, a, b = shape
    return (groups, b, a) if weight_layout == "out_in" else (groups, a, b)


def as_out_in(weight: torch.Tensor, weight_layout: str) -> torch.Tensor:
    """A ``(G, O, K)`` view of a weight stored in ``weight_layout`` (a transpose view for
    ``"in_out"``); the transpose is its own inverse, so it also turns ``(G, O, K)`` into
    ``weight_layout``'s storage."""
    return weight if weight_layout == "out_in" else weight.transpose(1, 2)


def bias_shape(groups: int, out_features: int, bias_layout: str) -> tuple[int, ...]:
    if bias_layout == "grouped":
        return (groups, out_features)
    if bias_layout == "broadcast":
        return (groups, 1, out_features)
    if bias_layout == "flat":
        return (groups * out_features,)
    raise KeyError(bias_layout)


def bias_layout_of(shape, groups: int, out_features: int) -> str | None:
    """The name of the bias layout of ``shape``, or None if it is none of them."""
    shape = tuple(shape)
    for name in BIAS_LAYOUTS:
        if shape == bias_shape(groups, out_features, name):
            return name
    return None


def bias_as_grouped(bias: torch.Tensor, groups: int, out_features: int) -> torch.Tensor:
    """A contiguous ``(G, O)`` view of a bias in any of :data:`BIAS_LAYOUTS`."""
    return bias.contiguous().view(groups, out_features)
