"""Layouts: how a user's tensors map to the (rows, groups, features) axes of the op.

Every op is a per-group contraction over "rows" (all the batch-like axes) and "features".
A :class:`Layout` says where those axes sit in the user's tensors and in the kernel's view of
them, on both sides of the code:

* TE (``row_dims``, ``shape``, ``index``, ``split``): the compute definitions in
  :mod:`tvmgroup.opdefs` are written once against these and serve every layout.
* torch (``check_input``, ``kernel_view``, ``out_shape``, ``einsum``, ``random``): the custom
  ops, the float64 references and the first-use checks.

``innermost`` tells schedules and kernels which axis is contiguous: the features
(``"last"``, ``"ensemble"``), a row axis (``"conv"``'s length L) or the groups
(``"groups_last"``); ``rows_innermost`` and ``groups_innermost`` ask it. ``row_axis`` says
which kernel-layout axis holds the rows a kernel call is split along. A layout may declare its
row-indexed buffers with symbolic strides (``buffer_strides``): the kernels then read views
in place (a slice of the rows, an input expanded over the groups) instead of copies. A new
layout is one subclass registered in :data:`LAYOUTS`, plus what its schedules need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tvm import te, tirx


class Layout:
    """One way of laying out the row-indexed tensors (x, y and their gradients)."""

    name: str
    innermost: str  # the contiguous axis: "features", "rows" or "groups"
    row_axis: int  # the kernel-layout axis a call's rows are split along
    row_letters: str  # einsum letters of the row axes, outermost first
    user_dims: str  # the user's tensor, for messages

    @property
    def rows_innermost(self) -> bool:
        """The contiguous axis is a row axis (``"conv"``'s L): schedules vectorise the rows."""
        return self.innermost == "rows"

    @property
    def groups_innermost(self) -> bool:
        """The contiguous axis is the groups (``"groups_last"``): schedules vectorise across
        groups, each lane a group of its own, and read the weight packed groups innermost."""
        return self.innermost == "groups"

    # -- TE side ---------------------------------------------------------------------------------
    def row_dims(self, rows: int | None) -> list:
        """The row axes' extents: symbolic ``te.var`` s, or fixed for ``rows`` rows in all."""
        raise NotImplementedError

    def shape(self, dims: Sequence, groups: int, features: int) -> list:
        """The kernel-layout shape of a row-indexed tensor."""
        raise NotImplementedError

    def index(self, row: tuple, g, f) -> tuple:
        """The kernel-layout index of (row axes, group, feature)."""
        raise NotImplementedError

    def split(self, idx: tuple) -> tuple[tuple, object, object]:
        """Splits a kernel-layout index into (row axes, group, feature)."""
        raise NotImplementedError

    def buffer_strides(self, name: str, shape: Sequence, output: bool = False) -> list | None:
        """The strides of row-indexed kernel buffer ``name`` of ``shape`` (an ``output`` of
        the op, or an input); None: compact."""
        return None

    # -- torch side ------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, groups: int, in_features: int) -> None:
        """Raises ``ValueError`` naming the expected shape unless ``x`` fits this layout."""
        raise NotImplementedError

    def kernel_view(self, t: torch.Tensor, groups: int, features: int) -> torch.Tensor:
        """The user's tensor as the kernel indexes it (a view of a contiguous tensor)."""
        raise NotImplementedError

    def out_shape(self, x: torch.Tensor, groups: int, features: int) -> list[int]:
        """The user-layout shape of the output for input ``x``."""
        raise NotImplementedError

    def einsum(self, feature: str) -> str:
        """The einsum operand of a kernel-layout tensor whose feature letter is ``feature``."""
        return f"{self.row_letters[0]}g{feature}{self.row_letters[1:]}"

    def bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        """A ``(G, O)`` bias broadcastable against a kernel-layout output."""
        raise NotImplementedError

    @property
    def row_sum_dims(self) -> tuple[int, ...]:
        """The kernel-layout dims a sum over rows runs over."""
        raise NotImplementedError

    def random(self, rows: int, groups: int, features: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
        """A standard-normal kernel-layout tensor of ``rows`` rows."""
        raise NotImplementedError


class FeaturesLast(Layout):
    """``(..., G*K) -> (..., G*O)``: the kernel sees ``(N, G, F)``, features contiguous."""

    name = "last"
    innermost = "features"
    row_axis = 0
    row_letters = "n"
    user_dims = "(..., groups*in_features)"

    def row_dims(self, rows):
        return [te.var("n") if rows is None else rows]

    def shape(self, dims, groups, features):
        return [dims[0], groups, features]

    def index(self, row, g, f):
        return (row[0], g, f)

    def split(self, idx):
        return (idx[0],), idx[1], idx[2]

    def check_input(self, x, groups, in_features):
        features = groups * in_features
        if x.dim() < 1:
            raise ValueError(f"x must have at least 1 dim {self.user_dims}, got a 0-dim tensor")
        if x.shape[-1] != features:
            raise ValueError(
                f"x's last dim must be groups*in_features = {groups}*{in_features} = {features}, "
                f"got x of shape {tuple(x.shape)}"
            )

    def kernel_view(self, t, groups, features):
        return t.contiguous().view(-1, groups, features)

    def out_shape(self, x, groups, features):
        return [*x.shape[:-1], groups * features]

    def bias_view(self, bias):
        return bias[None, :, :]

    @property
    def row_sum_dims(self):
        return (0,)

    def random(self, rows, groups, features, dtype, device="cpu"):
        return torch.randn(rows, groups, features).to(device=device, dtype=dtype)


class Heads(FeaturesLast):
    """``(..., G, K) -> (..., G, O)`` (one group per head, as attention's ``(B, L, H, D)``
    tensors hold them): the kernel sees ``(N, G, F)``, features contiguous, as for ``"last"``.

    Inputs are declared with symbolic row and group strides (``buffer_strides``), so the
    kernel reads in place any view whose features are contiguous: heads sliced out of a
    bigger tensor, or one input expanded over the groups (stride 0: ``layout="shared_last"``).
    Outputs are compact.
    """

    name = "heads"
    user_dims = "(..., groups, in_features)"

    def buffer_strides(self, name, shape, output=False):
        if output:  # tvmgroup's own compact tensors, or row slices of them
            return None
        return [tirx.Var(f"{name}_stride_n", "int32"), tirx.Var(f"{name}_stride_g", "int32"), 1]

    def check_input(self, x, groups, in_features):
        if x.dim() < 2 or x.shape[-2] != groups or x.shape[-1] != in_features:
            raise ValueError(
                f"layout='heads' expects x of shape {self.user_dims} = (..., {groups}, {in_features}), "
                f"got x of shape {tuple(x.shape)}"
            )

    def kernel_view(self, t, groups, features):
        view = _rows_compact(_view_or_none(t, -1, groups, features))
        return view if view is not None else t.contiguous().view(-1, groups, features)

    def out_shape(self, x, groups, features):
        return [*x.shape[:-2], groups, features]


class Conv(Layout):
    """``(B, G*K, L) -> (B, G*O, L)`` (Conv1d's layout): the kernel sees ``(B, G, F, L)``.

    B and L are both row axes and both symbolic; L is contiguous.
    """

    name = "conv"
    innermost = "rows"
    row_axis = 3
    row_letters = "bl"
    user_dims = "(batch, groups*in_features, length)"

    def row_dims(self, rows):
        return [te.var("b"), te.var("l")] if rows is None else [1, rows]

    def shape(self, dims, groups, features):
        return [dims[0], groups, features, dims[1]]

    def index(self, row, g, f):
        return (row[0], g, f, row[1])

    def split(self, idx):
        return (idx[0], idx[3]), idx[1], idx[2]

    def check_input(self, x, groups, in_features):
        features = groups * in_features
        if x.dim() != 3:
            raise ValueError(
                f"layout='conv' expects x of shape {self.user_dims}, got {x.dim()} dims: {tuple(x.shape)}"
            )
        if x.shape[1] != features:
            raise ValueError(
                f"x's dim 1 must be groups*in_features = {groups}*{in_features} = {features}, "
                f"got x of shape {tuple(x.shape)}"
            )

    def kernel_view(self, t, groups, features):
        t = t.contiguous()
        return t.view(t.shape[0], groups, features, t.shape[2])

    def out_shape(self, x, groups, features):
        return [x.shape[0], groups * features, x.shape[2]]

    def bias_view(self, bias):
        return bias[None, :, :, None]

    @property
    def row_sum_dims(self):
        return (0, 3)

    def random(self, rows, groups, features, dtype, device="cpu"):
        return torch.randn(1, groups, features, rows).to(device=device, dtype=dtype)


class EnsembleFirst(Layout):
    """``(G, ..., K) -> (G, ..., O)`` (an ensemble's members first, as ``bmm`` takes them): the
    kernel sees ``(G, N, F)``, features contiguous.

    The group and row axes have symbolic strides (``buffer_strides``), so the kernel reads
    in place any view whose features are contiguous: a slice of the rows of a bigger batch
    (which the row split of :mod:`tvmgroup.kernel` makes), rows strided or time-major
    (``(B, G, K).transpose(0, 1)``), or one input expanded over the members (stride 0).
    """

    name = "ensemble"
    innermost = "features"
    row_axis = 1
    row_letters = "n"
    user_dims = "(groups, ..., in_features)"

    def row_dims(self, rows):
        return [te.var("n") if rows is None else rows]

    def shape(self, dims, groups, features):
        return [groups, dims[0], features]

    def index(self, row, g, f):
        return (g, row[0], f)

    def split(self, idx):
        return (idx[1],), idx[0], idx[2]

    def buffer_strides(self, name, shape, output=False):
        # Outputs are tvmgroup's own compact tensors, or row slices of them: their rows are
        # ``features`` apart. A constant row stride lets the compiler see that the rows of a
        # register tile never overlap (a symbolic one might be 0), so it keeps their sums in
        # registers.
        row_stride = shape[2] if output else tirx.Var(f"{name}_stride_n", "int32")
        return [tirx.Var(f"{name}_stride_g", "int32"), row_stride, 1]

    def check_input(self, x, groups, in_features):
        if x.dim() < 2:
            raise ValueError(
                f"layout='ensemble' expects x of shape {self.user_dims} (at least 2 dims), got {tuple(x.shape)}"
            )
        if x.shape[0] != groups or x.shape[-1] != in_features:
            raise ValueError(
                f"layout='ensemble' expects x of shape (groups={groups}, ..., in_features={in_features}), "
                f"got x of shape {tuple(x.shape)}"
            )

    def kernel_view(self, t, groups, features):
        view = _rows_compact(t.view(groups, -1, features) if t.is_contiguous() else _view_or_none(t, groups, -1, features))
        return view if view is not None else t.contiguous().view(groups, -1, features)

    def out_shape(self, x, groups, features):
        return [groups, *x.shape[1:-1], features]

    def einsum(self, feature):
        return f"gn{feature}"

    def bias_view(self, bias):
        return bias[:, None, :]

    @property
    def row_sum_dims(self):
        return (1,)

    def random(self, rows, groups, features, dtype, device="cpu"):
        return torch.randn(groups, rows, features).to(device=device, dtype=dtype)


class GroupsLast(Layout):
    """``(..., K, G) -> (..., O, G)`` (a channels-last series ``(B, L, C)`` with one head per
    channel: K = L, G = C): the kernel sees ``(N, F, G)``, the groups contiguous.

    The user's tensors are the kernel's buffers (no copy of a contiguous x). Schedules
    vectorise across the groups where they fill whole vectors (each lane a group, the weight
    packed groups innermost), else along the features as for ``"last"``, on row tiles copied
    features innermost inside the kernel (:func:`tvmgroup.opdefs.vectorises_groups`).
    """

    name = "groups_last"
    innermost = "groups"
    row_axis = 0
    row_letters = "n"
    user_dims = "(..., in_features, groups)"

    def row_dims(self, rows):
        return [te.var("n") if rows is None else rows]

    def shape(self, dims, groups, features):
        return [dims[0], features, groups]

    def index(self, row, g, f):
        return (row[0], f, g)

    def split(self, idx):
        return (idx[0],), idx[2], idx[1]

    def check_input(self, x, groups, in_features):
        if x.dim() < 2 or x.shape[-2] != in_features or x.shape[-1] != groups:
            swapped = x.dim() >= 2 and tuple(x.shape[-2:]) == (groups, in_features) and groups != in_features
            hint = " (its last two dims are (groups, in_features): swap them)" if swapped else ""
            raise ValueError(
                f"layout='groups_last' expects x of shape {self.user_dims} = (..., {in_features}, {groups}), "
                f"got x of shape {tuple(x.shape)}{hint}"
            )

    def kernel_view(self, t, groups, features):
        return t.contiguous().view(-1, features, groups)

    def out_shape(self, x, groups, features):
        return [*x.shape[:-2], features, groups]

    def einsum(self, feature):
        return f"n{feature}g"

    def bias_view(self, bias):
        return bias.t()[None, :, :]

    @property
    def row_sum_dims(self):
        return (0,)

    def random(self, rows, groups, features, dtype, device="cpu"):
        return torch.randn(rows, features, groups).to(device=device, dtype=dtype)


def _view_or_none(t: torch.Tensor, *shape: int) -> torch.Tensor | None:
    """``t.view(*shape)``, or None where its axes do not merge without a copy."""
    try:
        return t.view(*shape)
    except RuntimeError:  # the row axes do not merge without a copy
        return None


def _rows_compact(view: torch.Tensor | None) -> torch.Tensor | None:
    """``view`` (kernel layout, features on axis 2) if a strided kernel buffer takes it
    (features contiguous), or None.

    A stride of an axis of extent 1 does not matter to the data; the feature axis's is set to
    1 where it is the only element.
    """
    if view is None:
        return None
    if view.stride(2) == 1:
        return view
    if view.shape[2] == 1:
        return view.as_strided(view.shape, (view.stride(0), view.stride(1), 1))
    return None


LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (FeaturesLast(), Conv(), EnsembleFirst(), GroupsLast(), Heads())
}


@dataclass(frozen=True)
class SharedInput:
    """Not a kernel layout: one input ``(..., K)`` read by every group. It runs on the kernels
    of ``kernel_layout`` with the input expanded over the groups (a stride-0 view they read in
    place); autograd of that expand sums grad_x over the groups."""

    name: str
    kernel_layout: str

    @property
    def group_axis(self) -> int:
        """The axis of the expanded input that holds the groups (grad_x sums over it)."""
        return 0 if self.kernel_layout == "ensemble" else -2

    def expand(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """``x`` as a ``kernel_layout`` input of ``groups`` groups (a view)."""
        if self.group_axis == 0:
            return x.expand(groups, *x.shape)
        return x.unsqueeze(-2).expand(*x.shape[:-1], groups, x.shape[-1])

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The ``kernel_layout`` output ``y`` in this layout (a view)."""
        return y if self.group_axis == 0 else y.flatten(-2)


SHARED_INPUTS: dict[str, SharedInput] = {
    shared.name: shared
    for shared in (
        SharedInput("shared", "ensemble"),  # output (G, ..., O)
        SharedInput("shared_last", "heads"),  # output (..., G*O)
    )
}


def kernel_layout_of(layout: str) -> str:
    """The kernel layout a ``layout`` argument runs on: itself, or a shared input's."""
    shared = SHARED_INPUTS.get(layout)
    return shared.kernel_layout if shared is not None else layout


def layout_names() -> tuple[str, ...]:
    """What the ``layout`` argument of the functional form and the module takes."""
    return (*LAYOUTS, *SHARED_INPUTS)


def layout_of(name: str) -> Layout:
    """The registered layout called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {name!r}") from None
