"""``GroupedLinear``: the nn.Module, and converters from and to Conv1d / a list of Linear."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from tvmgroup.functional import grouped_linear
from tvmgroup.validation import check_layout


class GroupedLinear(nn.Module):
    """G independent linear maps of K -> O features, applied to G slices of the input.

    The same as ``nn.Conv1d(G*K, G*O, kernel_size=1, groups=G)`` (``layout="conv"``) or G
    ``nn.Linear(K, O)`` on consecutive feature slices (``layout="last"``), computed by one
    TVM-generated kernel per pass.
    """

    def __init__(
        self,
        groups: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        layout: str = "last",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("groups", groups), ("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_layout(layout)
        self.groups, self.in_features, self.out_features, self.layout = groups, in_features, out_features, layout
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(groups, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each group initialised as ``nn.Linear(in_features, out_features)`` would be."""
        for g in range(self.groups):
            nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, self.bias, layout=self.layout)

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout!r}"
        )

    # -- converters ---------------------------------------------------------------------------

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d) -> "GroupedLinear":
        """A layer computing what ``conv`` computes (Conv1d layout), sharing no storage with it."""
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"from_conv1d expects an nn.Conv1d, got {type(conv).__name__}")
        wrong = {
            "kernel_size": (conv.kernel_size, (1,)),
            "stride": (conv.stride, (1,)),
            "padding": (conv.padding, (0,)),
            "dilation": (conv.dilation, (1,)),
        }
        for name, (got, expected) in wrong.items():
            if isinstance(got, str) or tuple(got) != expected:
                raise ValueError(f"from_conv1d needs {name}={expected[0]}, got {name}={got!r}")
        if conv.padding_mode != "zeros" and conv.padding != (0,):
            raise ValueError(f"from_conv1d needs no padding, got padding_mode={conv.padding_mode!r}")
        groups = conv.groups
        layer = cls(
            groups, conv.in_channels // groups, conv.out_channels // groups, conv.bias is not None,
            layout="conv", device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight.reshape(layer.weight.shape))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.reshape(layer.bias.shape))
        return layer

    @classmethod
    def from_linears(cls, linears: Iterable[nn.Linear]) -> "GroupedLinear":
        """A ``layout="last"`` layer equal to applying each Linear to its slice of features."""
        linears = list(linears)
        if not linears:
            raise ValueError("from_linears needs at least one nn.Linear, got none")
        first = linears[0]
        for i, lin in enumerate(linears):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"from_linears expects nn.Linear modules, item {i} is {type(lin).__name__}")
            got = (lin.in_features, lin.out_features, lin.bias is not None)
            want = (first.in_features, first.out_features, first.bias is not None)
            if got != want:
                raise ValueError(
                    f"all Linears must match (in_features, out_features, has_bias) = {want}; item {i} has {got}"
                )
        layer = cls(
            len(linears), first.in_features, first.out_features, first.bias is not None,
            layout="last", device=first.weight.device, dtype=first.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(torch.stack([lin.weight for lin in linears]))
            if first.bias is not None:
                layer.bias.copy_(torch.stack([lin.bias for lin in linears]))
        return layer

    def to_conv1d(self) -> nn.Conv1d:
        """The equivalent ``nn.Conv1d(G*K, G*O, kernel_size=1, groups=G)``."""
        g, k, o = self.groups, self.in_features, self.out_features
        conv = nn.Conv1d(
            g * k, g * o, kernel_size=1, groups=g, bias=self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight.reshape(g * o, k, 1))
            if self.bias is not None:
                conv.bias.copy_(self.bias.reshape(g * o))
        return conv
