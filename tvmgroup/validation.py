"""Input checks with messages that say what was expected and what came."""

from __future__ import annotations

import torch

from tvmgroup.layouts import layout_names, layout_of
from tvmgroup.target import family_for_device
from tvmgroup.weights import BIAS_LAYOUTS, WEIGHT_LAYOUTS, bias_layout_of, bias_shape, check_weight_layout, weight_dims


def check_layout(layout: str) -> None:
    """The ``layout`` argument: a kernel layout, or a shared input's (``"shared"``,
    ``"shared_last"``: one input for all groups)."""
    if not isinstance(layout, str) or layout not in layout_names():
        raise ValueError(f"layout must be one of {layout_names()}, got {layout!r}")


def check_shared_input(x: torch.Tensor, in_features: int, layout: str = "shared") -> None:
    """``layout="shared"`` or ``"shared_last"``: x is ``(..., in_features)``, the same input
    for every group."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"layout={layout!r} expects x of shape (..., in_features={in_features}), read by every group; "
            f"got x of shape {tuple(x.shape)}"
        )


def check_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, weight_layout: str = "out_in"
) -> tuple[int, int, int]:
    """Returns (groups, in_features, out_features) of a weight stored in ``weight_layout``."""
    check_weight_layout(weight_layout)
    dims = WEIGHT_LAYOUTS[weight_layout]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 3:
        raise ValueError(
            f"weight_layout={weight_layout!r} takes a weight of shape {dims}, got {tuple(weight.shape)}"
        )
    groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
    if min(groups, out_features, in_features) < 1:
        raise ValueError(f"weight must have no empty dim, got shape {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias_layout_of(bias.shape, groups, out_features) is None:
            shapes = " or ".join(
                f"{dims} = {bias_shape(groups, out_features, name)}" for name, dims in BIAS_LAYOUTS.items()
            )
            raise ValueError(f"bias must have shape {shapes}, got {tuple(bias.shape)}")
    return groups, in_features, out_features


def check_input(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str, weight_layout: str = "out_in"
) -> None:
    """Validates a forward call; raises ValueError/TypeError naming expected vs got."""
    lay = layout_of(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    groups, in_features, _ = check_weight(weight, bias, weight_layout)
    try:
        lay.check_input(x, groups, in_features)
    except ValueError as err:
        raise ValueError(f"{err}{_other_convention_hint(x, weight, lay, weight_layout)}") from None
    tensors = {"x": x, "weight": weight} | ({"bias": bias} if bias is not None else {})
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    check_dtype(x)


def _other_convention_hint(x: torch.Tensor, weight: torch.Tensor, lay, weight_layout: str) -> str:
    """A note when x would fit the weight read in the other convention (a (G, K, O) weight
    passed as (G, O, K), or the reverse)."""
    other = next(name for name in WEIGHT_LAYOUTS if name != weight_layout)
    groups, in_features, _ = weight_dims(weight.shape, other)
    try:
        lay.check_input(x, groups, in_features)
    except ValueError:
        return ""
    return f" (weight {tuple(weight.shape)} read as weight_layout={other!r} {WEIGHT_LAYOUTS[other]} would fit)"


def check_dtype(x: torch.Tensor) -> None:
    # Storage dtypes of the device's target family (half types sum in float32); a device no
    # family serves raises a ValueError naming the ones that are.
    supported = family_for_device(x.device.type).dtypes
    if x.dtype not in supported:
        names = ", ".join(str(d) for d in supported)
        raise TypeError(
            f"tvmgroup on {x.device.type} supports dtype {names}, got {x.dtype}; "
            f"cast with x.float() (and the layer with .float())"
        )
