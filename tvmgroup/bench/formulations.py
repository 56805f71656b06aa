"""The registry of formulations: the ways to compute a grouped linear layer that are timed.

Every formulation is built from the same ``weight`` ``(G, O, K)`` and ``bias`` ``(G, O)``, so all
compute the same ``y[n, g, :] = x[n, g, :] @ weight[g].T + bias[g]``. Each owns leaf copies of
its parameters, stored as its own code would keep them (an ensemble's ``(G, K, O)`` weight and
``(G, 1, O)`` bias), so gradients land on them, and reports its gradients in the common
``(G, O, K)`` / ``(G, O)`` form for the correctness check.

Every formulation builds on the device and in the dtype of the ``weight`` it is given
(``tvmgroup bench --device/--dtype``); :attr:`Formulation.devices` says where it runs at all.

Each formulation takes its input in one layout of :data:`tvmgroup.bench.inputs.INPUT_LAYOUTS`
(``Formulation.layout``): ``"last"``, ``x`` is ``(N, G*K)`` and ``y`` is ``(N, G*O)`` (features
last, as for ``nn.Linear``); ``"conv"``, ``(1, G*K, N)`` -> ``(1, G*O, N)`` (channels first, the
natural ``nn.Conv1d`` layout: N is its length axis); ``"ensemble"``, ``(G, N, K)`` ->
``(G, N, O)`` (an ensemble's members first); ``"shared"``, ``(N, K)`` -> ``(G, N, O)`` (one
input read by every member); ``"shared_last"``, ``(N, K)`` -> ``(N, G*O)``. ``tvmgroup bench --layout`` picks the set of formulations
(:data:`BY_LAYOUT`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvmgroup.bench.inputs import input_layout
from tvmgroup.bench.shapes import Shape
from tvmgroup.layouts import LAYOUTS, SHARED_INPUTS
from tvmgroup.opdefs import reference_pass
from tvmgroup.weights import as_out_in

# The dense block-diagonal weight has (G*O) * (G*K) elements; past this it is not built.
MAX_DENSE_ELEMENTS = 1 << 26


class Instance:
    """One built formulation: call it on an input in its layout; read gradients back."""

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        raise NotImplementedError

    def grads(self) -> tuple[Tensor, Tensor]:
        """(grad_weight (G, O, K), grad_bias (G, O)) after a backward pass."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def schedules(self) -> ContextManager:
        """The context its calls (forward and backward) run in: which schedules serve them."""
        return contextlib.nullcontext()


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


# -- the formulations --------------------------------------------------------------------------


class LinearLoop(Instance):
    """A ModuleList of G ``nn.Linear(K, O)``: slice the input, apply each, ``torch.cat``."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        groups, out_features, in_features = weight.shape
        self.k = in_features
        self.linears = nn.ModuleList(
            nn.Linear(in_features, out_features, device=weight.device, dtype=weight.dtype) for _ in range(groups)
        )
        with torch.no_grad():
            for g, lin in enumerate(self.linears):
                lin.weight.copy_(weight[g])
                lin.bias.copy_(bias[g])

    def __call__(self, x: Tensor) -> Tensor:
        k = self.k
        return torch.cat([lin(x[:, g * k:(g + 1) * k]) for g, lin in enumerate(self.linears)], dim=1)

    def parameters(self) -> list[Tensor]:
        return list(self.linears.parameters())

    def grads(self) -> tuple[Tensor, Tensor]:
        return (torch.stack([lin.weight.grad for lin in self.linears]),
                torch.stack([lin.bias.grad for lin in self.linears]))


class GroupedConv(Instance):
    """``nn.Conv1d(G*K, G*O, kernel_size=1, groups=G)`` on ``(1, G*K, N)``."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        groups, out_features, in_features = weight.shape
        self.shape = weight.shape
        self.conv = nn.Conv1d(groups * in_features, groups * out_features, kernel_size=1, groups=groups,
                              device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(weight.reshape(groups * out_features, in_features, 1))
            self.conv.bias.copy_(bias.reshape(-1))

    def __call__(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def parameters(self) -> list[Tensor]:
        return [self.conv.weight, self.conv.bias]

    def grads(self) -> tuple[Tensor, Tensor]:
        groups, out_features, _ = self.shape
        return self.conv.weight.grad.reshape(self.shape), self.conv.bias.grad.reshape(groups, out_features)


class Combined(Instance):
    """Formulations on one combined ``(G, O, K)`` weight and ``(G, O)`` bias."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight, self.bias = _leaf(weight), _leaf(bias)

    def parameters(self) -> list[Tensor]:
        return [self.weight, self.bias]

    def grads(self) -> tuple[Tensor, Tensor]:
        return self.weight.grad, self.bias.grad


def bmm_forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``baddbmm`` on strided views: x as (G, N, K), W^T as (G, K, O); the result is copied
    back from (G, N, O) into the (N, G*O) layout the caller expects."""
    n = x.shape[0]
    groups, out_features, in_features = weight.shape
    xg = x.view(n, groups, in_features).transpose(0, 1)
    y = torch.baddbmm(bias.unsqueeze(1), xg, weight.transpose(1, 2))
    return y.transpose(0, 1).reshape(n, groups * out_features)


class Bmm(Combined):
    def __call__(self, x: Tensor) -> Tensor:
        return bmm_forward(x, self.weight, self.bias)


class CompiledBmm(Combined):
    """``torch.compile`` of :func:`bmm_forward` at this static shape; the first calls compile."""

    mode: str | None = None

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__(weight, bias)
        torch._dynamo.reset()  # each shape starts with fresh caches and recompile limits
        self.fn = torch.compile(bmm_forward, dynamic=False, mode=self.mode)

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x, self.weight, self.bias)


class AutotunedBmm(CompiledBmm):
    """``torch.compile(mode="max-autotune")`` of :func:`bmm_forward`: Inductor times its own
    GEMM candidates (Triton templates, cuBLAS) while it compiles."""

    mode = "max-autotune"


class GroupedMm(Combined):
    """``torch.nn.functional.grouped_mm`` of x viewed (G, N, K) with W^T (G, K, O), + bias.

    The CUDA grouped-GEMM kernel of PyTorch's MoE layers; x's view is row-major per group and
    W^T column-major, the layouts that kernel takes without a copy.
    """

    def __call__(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        groups, out_features, in_features = self.weight.shape
        xg = x.view(n, groups, in_features).transpose(0, 1)
        y = F.grouped_mm(xg, self.weight.transpose(1, 2)) + self.bias.unsqueeze(1)
        return y.transpose(0, 1).reshape(n, groups * out_features)


class Einsum(Combined):
    def __call__(self, x: Tensor) -> Tensor:
        groups, out_features, in_features = self.weight.shape
        xg = x.view(x.shape[0], groups, in_features)
        y = torch.einsum("ngk,gok->ngo", xg, self.weight) + self.bias
        return y.reshape(x.shape[0], groups * out_features)


class Vmap(Combined):
    """``torch.func.vmap`` of ``F.linear`` over the group axis."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__(weight, bias)
        self.fn = torch.func.vmap(F.linear, in_dims=(1, 0, 0), out_dims=1)

    def __call__(self, x: Tensor) -> Tensor:
        groups, out_features, in_features = self.weight.shape
        y = self.fn(x.view(x.shape[0], groups, in_features), self.weight, self.bias)
        return y.reshape(x.shape[0], groups * out_features)


class BlockDiag(Combined):
    """One dense ``F.linear`` with the ``torch.block_diag`` weight ``(G*O, G*K)``.

    Without autograd the dense weight is built once, as inference would; with autograd it is
    built from the ``(G, O, K)`` parameter on every call, so that ``grad_weight`` stays
    block-diagonal, as training needs.
    """

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__(weight, bias)
        with torch.no_grad():
            self.dense = torch.block_diag(*self.weight.unbind(0))
            self.flat_bias = self.bias.reshape(-1).clone()

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return F.linear(x, torch.block_diag(*self.weight.unbind(0)), self.bias.reshape(-1))
        return F.linear(x, self.dense, self.flat_bias)


class TvmGroup(Instance):
    """``tvmgroup.GroupedLinear(layout="last")``; its first call of a shape compiles kernels.

    Subclasses change the layer's ``layout``, ``weight_layout`` and ``bias_layout``; the
    parameters are copied in (and their gradients read back) through views of the convention.
    """

    layout = "last"
    weight_layout = "out_in"
    bias_layout = "grouped"

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        from tvmgroup import GroupedLinear

        groups, out_features, in_features = weight.shape
        self.layer = GroupedLinear(groups, in_features, out_features, layout=self.layout,
                                   weight_layout=self.weight_layout, bias_layout=self.bias_layout,
                                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            as_out_in(self.layer.weight, self.weight_layout).copy_(weight)
            self.layer.bias.view(groups, out_features).copy_(bias)

    @property
    def kernel_layout(self) -> str:
        """The layout of the kernels the layer runs (what its schedules are looked up by)."""
        return self.layout

    def __call__(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def parameters(self) -> list[Tensor]:
        return [self.layer.weight, self.layer.bias]

    def grads(self) -> tuple[Tensor, Tensor]:
        weight, bias = self.layer.weight, self.layer.bias
        return as_out_in(weight.grad, self.weight_layout), bias.grad.reshape(weight.shape[0], -1)


class TvmGroupConv(TvmGroup):
    """``tvmgroup.GroupedLinear(layout="conv")`` on ``(1, G*K, N)``, as ``nn.Conv1d`` takes it."""

    layout = "conv"


class TvmGroupEnsemble(TvmGroup):
    """``tvmgroup.GroupedLinear(layout="ensemble", weight_layout="in_out",
    bias_layout="broadcast")``: an ensemble's ``(G, N, K)`` input and its ``(G, K, O)`` /
    ``(G, 1, O)`` parameters as it stores them."""

    layout = "ensemble"
    weight_layout = "in_out"
    bias_layout = "broadcast"


class TvmGroupShared(TvmGroupEnsemble):
    """``tvmgroup.GroupedLinear(layout="shared", ...)``: one ``(N, K)`` input read by every
    member, on the ``"ensemble"`` kernels."""

    layout = "shared"
    kernel_layout = SHARED_INPUTS["shared"].kernel_layout


class MatmulConv(Combined):
    """``torch.matmul`` of ``W (G, O, K)`` with the input viewed as ``(B, G, K, L)``, + bias."""

    def __call__(self, x: Tensor) -> Tensor:
        groups, out_features, in_features = self.weight.shape
        b, _, length = x.shape
        y = torch.matmul(self.weight, x.view(b, groups, in_features, length)) + self.bias.unsqueeze(-1)
        return y.view(b, groups * out_features, length)


class EnsembleParameters(Instance):
    """Formulations on an ensemble's parameters as it stores them: weight ``(G, K, O)``, bias
    ``(G, 1, O)`` (``y[g] = x[g] @ weight[g] + bias[g]``)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight = _leaf(weight.transpose(1, 2).contiguous())
        self.bias = _leaf(bias.unsqueeze(1))

    def parameters(self) -> list[Tensor]:
        return [self.weight, self.bias]

    def grads(self) -> tuple[Tensor, Tensor]:
        return self.weight.grad.transpose(1, 2), self.bias.grad.squeeze(1)


class BaddbmmEnsemble(EnsembleParameters):
    """``torch.baddbmm(bias, x, weight)`` on ``(G, N, K)``: what ensemble code writes."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class BmmEnsemble(EnsembleParameters):
    """``torch.bmm(x, weight) + bias`` on ``(G, N, K)``."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.bmm(x, self.weight) + self.bias


class EinsumEnsemble(EnsembleParameters):
    """``torch.einsum("gnk,gko->gno", x, weight) + bias``."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.einsum("gnk,gko->gno", x, self.weight) + self.bias


class MatmulShared(EnsembleParameters):
    """``torch.matmul(x, weight) + bias``: ``x (N, K)`` broadcast against ``weight (G, K, O)``."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias


class BaddbmmShared(EnsembleParameters):
    """``torch.baddbmm(bias, x.expand(G, N, K), weight)``: the input expanded over the members."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x.expand(self.weight.shape[0], *x.shape), self.weight)


class EinsumShared(EnsembleParameters):
    """``torch.einsum("nk,gko->gno", x, weight) + bias``."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.einsum("nk,gko->gno", x, self.weight) + self.bias


class LinearStacked(Combined):
    """``F.linear(x, weight.view(G*O, K), bias.view(G*O))``: one input for every group with
    the output features-last is one ``nn.Linear(K, G*O)`` of the stacked weight."""

    def __call__(self, x: Tensor) -> Tensor:
        groups, out_features, in_features = self.weight.shape
        return F.linear(x, self.weight.view(groups * out_features, in_features), self.bias.view(-1))


class EinsumSharedLast(Combined):
    """``torch.einsum("nk,gok->ngo", x, weight) + bias``, flattened to ``(N, G*O)``."""

    def __call__(self, x: Tensor) -> Tensor:
        return (torch.einsum("nk,gok->ngo", x, self.weight) + self.bias).flatten(1)


class TvmGroupSharedLast(TvmGroup):
    """``tvmgroup.GroupedLinear(layout="shared_last")``: one ``(N, K)`` input read by every
    group, output ``(N, G*O)``, on the ``"heads"`` kernels."""

    layout = "shared_last"
    kernel_layout = SHARED_INPUTS["shared_last"].kernel_layout


# -- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Formulation:
    name: str
    description: str
    build: Callable[[Tensor, Tensor], Instance]
    layout: str = "last"
    is_tvmgroup: bool = False
    is_default: bool = False  # a tvmgroup formulation forced onto its default schedules
    fits: Callable[[Shape], bool] = lambda shape: True
    devices: tuple[str, ...] = ("cpu", "cuda")
    # None where this torch build has what the formulation needs, else why not.
    unavailable: Callable[[], str | None] = lambda: None

    def why_not(self, shape: Shape, device: str = "cpu") -> str | None:
        """None if this formulation runs at ``shape`` on ``device``, else the reason it is skipped."""
        if device not in self.devices:
            return f"runs on {' and '.join(self.devices)} only, not on {device}"
        missing = self.unavailable()
        if missing:
            return missing
        if not self.fits(shape):
            return "the dense weight would be too large"
        return None


def _grouped_mm_missing() -> str | None:
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    return None


def _dense_fits(shape: Shape) -> bool:
    return shape.groups * shape.out_features * shape.groups * shape.in_features <= MAX_DENSE_ELEMENTS


FORMULATIONS: dict[str, Formulation] = {
    f.name: f
    for f in (
        Formulation("linear-loop", "ModuleList of nn.Linear: slice, apply, torch.cat", LinearLoop),
        Formulation("conv1d", "nn.Conv1d(G*K, G*O, 1, groups=G) on a contiguous (1, G*K, N)", GroupedConv,
                    layout="conv"),
        Formulation("bmm", "torch.baddbmm on strided (G, N, K) views, copied back to (N, G*O)", Bmm),
        Formulation("einsum", "torch.einsum('ngk,gok->ngo') + bias", Einsum),
        Formulation("vmap", "torch.func.vmap of F.linear over groups", Vmap),
        Formulation("compile-bmm", "torch.compile of the bmm formulation (static shape)", CompiledBmm),
        Formulation("autotune-bmm", 'torch.compile(mode="max-autotune") of the bmm formulation', AutotunedBmm,
                    devices=("cuda",)),
        Formulation("grouped-mm", "torch.nn.functional.grouped_mm of (G, N, K) views, + bias", GroupedMm,
                    devices=("cuda",), unavailable=_grouped_mm_missing),
        Formulation("block-diag", "F.linear with the dense torch.block_diag weight", BlockDiag,
                    fits=_dense_fits),
        Formulation("tvmgroup", "tvmgroup.GroupedLinear(layout='last')", TvmGroup, is_tvmgroup=True),
        Formulation("matmul-conv", "torch.matmul of W (G,O,K) with x viewed (1, G, K, N), + bias",
                    MatmulConv, layout="conv"),
        Formulation("tvmgroup-conv", "tvmgroup.GroupedLinear(layout='conv') on (1, G*K, N)", TvmGroupConv,
                    layout="conv", is_tvmgroup=True),
        Formulation("baddbmm-ensemble", "torch.baddbmm(b, x, W): x (G,N,K), W (G,K,O), b (G,1,O)",
                    BaddbmmEnsemble, layout="ensemble"),
        Formulation("bmm-ensemble", "torch.bmm(x, W) + b on (G, N, K)", BmmEnsemble, layout="ensemble"),
        Formulation("einsum-ensemble", "torch.einsum('gnk,gko->gno', x, W) + b", EinsumEnsemble,
                    layout="ensemble"),
        Formulation("tvmgroup-ensemble", "tvmgroup.GroupedLinear(layout='ensemble'), weight (G,K,O) 'in_out', "
                    "bias (G,1,O) 'broadcast'", TvmGroupEnsemble, layout="ensemble", is_tvmgroup=True),
        Formulation("matmul-shared", "torch.matmul(x, W) + b: x (N,K) broadcast against W (G,K,O)",
                    MatmulShared, layout="shared"),
        Formulation("baddbmm-shared", "torch.baddbmm(b, x.expand(G, N, K), W)", BaddbmmShared,
                    layout="shared"),
        Formulation("einsum-shared", "torch.einsum('nk,gko->gno', x, W) + b", EinsumShared, layout="shared"),
        Formulation("tvmgroup-shared", "tvmgroup.GroupedLinear(layout='shared'), weight (G,K,O) 'in_out', "
                    "bias (G,1,O) 'broadcast'", TvmGroupShared, layout="shared", is_tvmgroup=True),
        Formulation("linear-shared_last", "F.linear(x, W.view(G*O, K), b.view(G*O)): one nn.Linear of the "
                    "stacked weight", LinearStacked, layout="shared_last"),
        Formulation("einsum-shared_last", "torch.einsum('nk,gok->ngo', x, W) + b, flattened", EinsumSharedLast,
                    layout="shared_last"),
        Formulation("tvmgroup-shared_last", "tvmgroup.GroupedLinear(layout='shared_last')", TvmGroupSharedLast,
                    layout="shared_last", is_tvmgroup=True),
    )
}

class DefaultSchedules(Instance):
    """A tvmgroup formulation run on its default schedules, whatever tuning logs there are
    (``tvmgroup bench --compare-default``: the tuned and the default layer in one run)."""

    def __init__(self, inner: Instance) -> None:
        self.inner = inner
        self.kernel_layout, self.weight_layout = inner.kernel_layout, inner.weight_layout

    def __call__(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def parameters(self) -> list[Tensor]:
        return self.inner.parameters()

    def grads(self) -> tuple[Tensor, Tensor]:
        return self.inner.grads()

    def schedules(self) -> ContextManager:
        from tvmgroup.lookup import default_schedules

        return default_schedules()


DEFAULT_SUFFIX = "-default"


def with_defaults(formulations: list[Formulation]) -> list[Formulation]:
    """``formulations`` with each tvmgroup one followed by itself on its default schedules."""
    out = []
    for f in formulations:
        out.append(f)
        if f.is_tvmgroup:
            build = f.build
            out.append(replace(
                f, name=f.name + DEFAULT_SUFFIX, description=f"{f.description}, default schedules",
                build=lambda weight, bias, build=build: DefaultSchedules(build(weight, bias)), is_default=True,
            ))
    return out


# What a run times for each input layout (``tvmgroup bench --layout``, one entry per layout of
# tvmgroup.bench.inputs): the "last" run keeps nn.Conv1d as a PyTorch formulation of the same
# layer; the others time everything on their own input.
BY_LAYOUT: dict[str, tuple[str, ...]] = {
    "last": ("linear-loop", "conv1d", "bmm", "einsum", "vmap", "compile-bmm", "block-diag", "tvmgroup"),
    "conv": ("conv1d", "matmul-conv", "tvmgroup-conv"),
    "ensemble": ("baddbmm-ensemble", "bmm-ensemble", "einsum-ensemble", "tvmgroup-ensemble"),
    "shared": ("matmul-shared", "baddbmm-shared", "einsum-shared", "tvmgroup-shared"),
    "shared_last": ("linear-shared_last", "einsum-shared_last", "tvmgroup-shared_last"),
}

# What a GPU run adds to the layout's set: the GPU-only PyTorch formulations.
EXTRA_ON_DEVICE: dict[tuple[str, str], tuple[str, ...]] = {
    ("last", "cuda"): ("autotune-bmm", "grouped-mm"),
}


def select(names: str | None, layout: str = "last", device: str = "cpu") -> list[Formulation]:
    """The formulations named in a comma-separated list (for None, those of the ``layout``
    run, :data:`BY_LAYOUT`, plus :data:`EXTRA_ON_DEVICE` for ``device``), in registry order.

    Named formulations must belong to the ``layout`` run (on any device): the others compute
    another problem (one input for every group) or are compared in another run."""
    if layout not in BY_LAYOUT:
        raise ValueError(f"unknown bench layout {layout!r}; choose from {', '.join(BY_LAYOUT)}")
    if names is None:
        wanted = BY_LAYOUT[layout] + EXTRA_ON_DEVICE.get((layout, device), ())
        return [f for name, f in FORMULATIONS.items() if name in wanted]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in FORMULATIONS]
    if unknown or not wanted:
        raise ValueError(
            f"--formulations: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"choose from {', '.join(FORMULATIONS)}"
        )
    in_run = set(BY_LAYOUT[layout]).union(*(extra for (run, _), extra in EXTRA_ON_DEVICE.items() if run == layout))
    elsewhere = [n for n in wanted if n not in in_run]
    if elsewhere:
        runs = {n: [run for run, members in BY_LAYOUT.items() if n in members] for n in elsewhere}
        raise ValueError(
            f"--formulations: {', '.join(f'{n} (--layout {runs[n][0]})' for n in elsewhere)} "
            f"not in the --layout {layout} run, which times {', '.join(BY_LAYOUT[layout])}"
        )
    return [f for name, f in FORMULATIONS.items() if name in wanted]


# -- layouts and the float64 reference ---------------------------------------------------------


def reference(x: Tensor, weight: Tensor, bias: Tensor, grad_y: Tensor, layout: str = "last") -> dict[str, Tensor]:
    """The float64 results for ``x`` and ``grad_y`` in ``layout``, from the ops' references:
    ``y`` as ``(N, G*O)``, ``grad_x`` in ``x``'s layout, ``grad_weight`` ``(G, O, K)``,
    ``grad_bias`` ``(G, O)``.

    The references run on the rows form ``(N, G*K)``; ``grad_x`` comes back through the map of
    ``x`` to it (``InputLayout.x_rows``), differentiated by autograd."""
    rows = input_layout(layout)
    groups = weight.shape[0]
    x64 = x.detach().double().requires_grad_(True)
    with torch.enable_grad():
        x_rows = rows.x_rows(x64, groups)
    ref = reference_pass(LAYOUTS["last"], x_rows.detach(), weight, bias, rows.y_rows(grad_y.detach().double()))
    (ref["grad_x"],) = torch.autograd.grad(x_rows, x64, ref["grad_x"])
    return ref


def run_once(inst: Instance, layout: str, x: Tensor, grad_y: Tensor) -> dict[str, Tensor]:
    """One forward without autograd, one forward+backward, on ``x`` and ``grad_y`` in ``layout``;
    results as :func:`reference` gives them: y (N, G*O), grad_x as x, (G, O, K), (G, O)."""
    rows = input_layout(layout)
    with torch.no_grad():
        y_inference = rows.y_rows(inst(x)).clone()
    xl = x.detach().clone().requires_grad_(True)
    inst.zero_grad()
    y = inst(xl)
    y.backward(grad_y)
    grad_weight, grad_bias = inst.grads()
    return {
        "y": y_inference,
        "y_autograd": rows.y_rows(y.detach()),
        "grad_x": xl.grad,
        "grad_weight": grad_weight,
        "grad_bias": grad_bias,
    }


def relative_errors(got: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """max |got - ref| / max |ref| per output (``y_autograd`` is checked against ``y``)."""
    errors = {}
    for name, value in got.items():
        want = ref["y" if name == "y_autograd" else name]
        if tuple(value.shape) != tuple(want.shape):
            errors[name] = float("inf")
            continue
        scale = want.abs().max().item() or 1.0
        errors[name] = (value.double() - want).abs().max().item() / scale
    return errors
