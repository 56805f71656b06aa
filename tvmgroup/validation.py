"""Input checks with messages that say what was expected and what came."""

from __future__ import annotations

import torch

from tvmgroup.compute import LAYOUTS

SUPPORTED_DTYPES = {
    "cpu": (torch.float32,),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),  # half types accumulate in float32
}


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """Returns (groups, in_features, out_features) of a (G, O, K) weight."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 3:
        raise ValueError(
            f"weight must have shape (groups, out_features, in_features), got {tuple(weight.shape)}"
        )
    groups, out_features, in_features = weight.shape
    if min(groups, out_features, in_features) < 1:
        raise ValueError(f"weight must have no empty dim, got shape {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (groups, out_features):
            raise ValueError(
                f"bias must have shape (groups, out_features) = {(groups, out_features)}, "
                f"got {tuple(bias.shape)}"
            )
    return groups, in_features, out_features


def check_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> None:
    """Validates a forward call; raises ValueError/TypeError naming expected vs got."""
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    groups, in_features, _ = check_weight(weight, bias)
    features = groups * in_features
    if layout == "last":
        if x.dim() < 1:
            raise ValueError("x must have at least 1 dim (..., groups*in_features), got a 0-dim tensor")
        if x.shape[-1] != features:
            raise ValueError(
                f"x's last dim must be groups*in_features = {groups}*{in_features} = {features}, "
                f"got x of shape {tuple(x.shape)}"
            )
    else:
        if x.dim() != 3:
            raise ValueError(
                f"layout='conv' expects x of shape (batch, groups*in_features, length), "
                f"got {x.dim()} dims: {tuple(x.shape)}"
            )
        if x.shape[1] != features:
            raise ValueError(
                f"x's dim 1 must be groups*in_features = {groups}*{in_features} = {features}, "
                f"got x of shape {tuple(x.shape)}"
            )
    tensors = {"x": x, "weight": weight} | ({"bias": bias} if bias is not None else {})
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    check_dtype(x)


def check_dtype(x: torch.Tensor) -> None:
    supported = SUPPORTED_DTYPES.get(x.device.type)
    if supported is None:
        raise ValueError(f"tvmgroup runs on 'cpu' or 'cuda' tensors, got a tensor on {x.device.type!r}")
    if x.dtype not in supported:
        names = ", ".join(str(d) for d in supported)
        raise TypeError(
            f"tvmgroup on {x.device.type} supports dtype {names}, got {x.dtype}; "
            f"cast with x.float() (and the layer with .float())"
        )
