"""The input layouts ``tvmgroup bench --layout`` times: the shapes of a formulation's ``x`` and
``y``, and how they map to the rows form ``(N, G*F)`` in which results are checked.

Each formulation takes ``x`` and returns ``y`` in one of these layouts
(:attr:`~tvmgroup.bench.formulations.Formulation.layout`); its input buffers are drawn in that
layout's shapes. The float64 reference is computed once on the rows form (``x`` through
``x_rows``, ``grad_y`` through ``y_rows``): ``y`` is compared there, ``grad_x`` in ``x``'s own
layout, the reference's ``grad_x`` carried back through ``x_rows`` by autograd (the transpose of
a permutation, or for one input read by every group the sum over the groups).

A new layout is one :class:`InputLayout` in :data:`INPUT_LAYOUTS`, plus its formulations and
their set in :data:`tvmgroup.bench.formulations.BY_LAYOUT`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from tvmgroup.bench.shapes import Shape


@dataclass(frozen=True)
class InputLayout:
    """Where one layout puts rows (N), groups (G) and features (K in, O out)."""

    name: str
    x_dims: str  # for the help text and the report, e.g. "(N, G*K)"
    y_dims: str
    x_shape: Callable[[Shape], tuple[int, ...]]
    y_shape: Callable[[Shape], tuple[int, ...]]
    # x (or grad_x) of this layout as (N, G*K), differentiable; the second argument is G.
    x_rows: Callable[[Tensor, int], Tensor]
    # y (or grad_y) of this layout as (N, G*O).
    y_rows: Callable[[Tensor], Tensor]

    def x_elements(self, shape: Shape) -> int:
        """Elements of ``x`` (and of ``grad_x``): what the memory floor counts."""
        return math.prod(self.x_shape(shape))

    @property
    def summary(self) -> str:
        return f"x {self.x_dims} -> y {self.y_dims}"


def _members_first_rows(t: Tensor) -> Tensor:
    """(G, N, F) -> (N, G*F)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


INPUT_LAYOUTS: dict[str, InputLayout] = {
    layout.name: layout
    for layout in (
        InputLayout(
            "last", "(N, G*K)", "(N, G*O)",
            x_shape=lambda s: (s.n, s.groups * s.in_features),
            y_shape=lambda s: (s.n, s.groups * s.out_features),
            x_rows=lambda t, groups: t,
            y_rows=lambda t: t,
        ),
        # Channels first, N as nn.Conv1d's length axis.
        InputLayout(
            "conv", "(1, G*K, N)", "(1, G*O, N)",
            x_shape=lambda s: (1, s.groups * s.in_features, s.n),
            y_shape=lambda s: (1, s.groups * s.out_features, s.n),
            x_rows=lambda t, groups: t[0].t(),
            y_rows=lambda t: t[0].t(),
        ),
        # An ensemble's members first, as torch.baddbmm takes them.
        InputLayout(
            "ensemble", "(G, N, K)", "(G, N, O)",
            x_shape=lambda s: (s.groups, s.n, s.in_features),
            y_shape=lambda s: (s.groups, s.n, s.out_features),
            x_rows=lambda t, groups: _members_first_rows(t),
            y_rows=_members_first_rows,
        ),
        # One input read by every member (an ensemble's first layer): in the rows form, the
        # input repeated for each group.
        InputLayout(
            "shared", "(N, K)", "(G, N, O)",
            x_shape=lambda s: (s.n, s.in_features),
            y_shape=lambda s: (s.groups, s.n, s.out_features),
            x_rows=lambda t, groups: t.repeat(1, groups),
            y_rows=_members_first_rows,
        ),
        # The same input with the output features-last (a shared first layer before "last"
        # layers): one GEMM of the stacked weight, in PyTorch.
        InputLayout(
            "shared_last", "(N, K)", "(N, G*O)",
            x_shape=lambda s: (s.n, s.in_features),
            y_shape=lambda s: (s.n, s.groups * s.out_features),
            x_rows=lambda t, groups: t.repeat(1, groups),
            y_rows=lambda t: t,
        ),
    )
}


def input_layout(name: str) -> InputLayout:
    """The input layout called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return INPUT_LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown bench layout {name!r}; choose from {', '.join(INPUT_LAYOUTS)}") from None
