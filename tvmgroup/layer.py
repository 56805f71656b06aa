"""``GroupedLinear``: the nn.Module, and converters from and to Conv1d / a list of Linear /
stacked ensemble parameters."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from tvmgroup.functional import grouped_linear
from tvmgroup.validation import check_layout, check_weight
from tvmgroup.weights import (
    WEIGHT_LAYOUTS,
    as_out_in,
    bias_layout_of,
    bias_shape,
    check_bias_layout,
    check_weight_layout,
    weight_shape,
)


class GroupedLinear(nn.Module):
    """G independent linear maps of K -> O features, applied to G slices of the input.

    The same as ``nn.Conv1d(G*K, G*O, kernel_size=1, groups=G)`` (``layout="conv"``) or G
    ``nn.Linear(K, O)`` on consecutive feature slices (``layout="last"``), computed by one
    TVM-generated kernel per pass. ``layout="ensemble"`` takes ``(G, ..., K)``,
    ``layout="shared"`` one ``(..., K)`` input for every group (``"shared_last"``: the same
    with a ``(..., G*O)`` output), ``layout="groups_last"`` ``(..., K, G)`` -> ``(..., O, G)``:
    one ``nn.Linear(L, P)`` per channel of a ``(B, L, C)`` series, read and written in place,
    and ``layout="heads"`` ``(..., G, K)`` -> ``(..., G, O)``, inputs read in place at any
    strides with features contiguous.

    ``weight_layout`` and ``bias_layout`` say how the parameters are stored (see
    :mod:`tvmgroup.weights`): ``"out_in"`` ``(G, O, K)`` or ``"in_out"`` ``(G, K, O)``;
    ``"grouped"`` ``(G, O)``, ``"broadcast"`` ``(G, 1, O)`` or ``"flat"`` ``(G*O,)``. The
    kernels read them as stored, so a checkpoint in either convention loads as it is.
    A load that fails changes nothing: a key missing or unexpected (``strict``) or of the
    wrong shape leaves both parameters as they were.
    """

    def __init__(
        self,
        groups: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        layout: str = "last",
        weight_layout: str = "out_in",
        bias_layout: str = "grouped",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("groups", groups), ("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_layout(layout)
        check_weight_layout(weight_layout)
        check_bias_layout(bias_layout)
        self.groups, self.in_features, self.out_features, self.layout = groups, in_features, out_features, layout
        self.weight_layout, self.bias_layout = weight_layout, bias_layout
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(weight_shape(groups, in_features, out_features, weight_layout), **factory))
        self.bias = nn.Parameter(torch.empty(bias_shape(groups, out_features, bias_layout), **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each group initialised as ``nn.Linear(in_features, out_features)`` would be."""
        weight = as_out_in(self.weight, self.weight_layout)  # (G, O, K): fan-in is K either way
        for g in range(self.groups):
            nn.init.kaiming_uniform_(weight[g], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, self.bias, layout=self.layout, weight_layout=self.weight_layout)

    def extra_repr(self) -> str:
        text = (
            f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout!r}"
        )
        if self.weight_layout != "out_in":
            text += f", weight_layout={self.weight_layout!r}"
        if self.bias is not None and self.bias_layout != "grouped":
            text += f", bias_layout={self.bias_layout!r}"
        return text

    # -- checkpoints ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but all or nothing: with ``strict`` a missing or
        unexpected key raises before any parameter is touched (PyTorch's own check comes
        after the copies), and a wrong shape copies neither parameter."""
        if strict:
            expected = {name for name, p in self._parameters.items() if p is not None}
            missing = sorted(expected - set(state_dict))
            unexpected = sorted(set(state_dict) - expected)
            if missing or unexpected:
                parts = []
                if unexpected:
                    parts.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
                if missing:
                    parts.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(parts)
                    + "\n\tNothing was loaded."
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Checks the shapes of all of this layer's keys first; copies nothing unless all fit
        (also when the layer is loaded as part of a bigger model)."""
        errors = []
        for name, param in self._parameters.items():
            got = state_dict.get(prefix + name) if param is not None else None
            if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(param.shape):
                errors.append(self._shape_error(name, prefix + name, tuple(got.shape), tuple(param.shape)))
        if errors:
            error_msgs.extend(errors)
            return  # nothing copied: the layer is as it was
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _shape_error(self, name: str, key: str, got: tuple, want: tuple) -> str:
        g, k, o = self.groups, self.in_features, self.out_features
        if name == "weight":
            layouts = [wl for wl in WEIGHT_LAYOUTS if weight_shape(g, k, o, wl) == got]
            hint = f"; build the layer with weight_layout={layouts[0]!r} to load it" if layouts else ""
            return (
                f"size mismatch for {key}: the checkpoint has {got}, this GroupedLinear keeps "
                f"{want} (weight_layout={self.weight_layout!r}: {WEIGHT_LAYOUTS[self.weight_layout]}){hint}"
            )
        layout = bias_layout_of(got, g, o)
        hint = f"; build the layer with bias_layout={layout!r} to load it" if layout else ""
        return (
            f"size mismatch for {key}: the checkpoint has {got}, this GroupedLinear keeps {want} "
            f"(bias_layout={self.bias_layout!r}){hint}"
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
    def from_ensemble(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, layout: str = "ensemble"
    ) -> "GroupedLinear":
        """A layer from stacked ensemble parameters: ``weight`` ``(E, in, out)`` and ``bias``
        ``(E, 1, out)``, ``(E, out)`` or None, i.e. ``y[e] = x[e] @ weight[e] + bias[e]``, on
        inputs ``(E, ..., in)`` (``layout="ensemble"``; any other layout can be asked for).

        The layer keeps both conventions (``weight_layout="in_out"`` and the bias's layout),
        so its ``state_dict`` is the ensemble's; the tensors are copied, not shared.
        """
        groups, in_features, out_features = check_weight(weight, bias, "in_out")
        bias_layout = "grouped" if bias is None else bias_layout_of(bias.shape, groups, out_features)
        layer = cls(
            groups, in_features, out_features, bias is not None, layout=layout, weight_layout="in_out",
            bias_layout=bias_layout, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
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
            conv.weight.copy_(as_out_in(self.weight, self.weight_layout).reshape(g * o, k, 1))
            if self.bias is not None:
                conv.bias.copy_(self.bias.reshape(g * o))
        return conv
