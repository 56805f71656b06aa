"""The registry of formulations: the ways to compute a grouped linear layer that are timed.

Every formulation is built from the same ``weight`` ``(G, O, K)`` and ``bias`` ``(G, O)``, so all
compute the same ``y[n, g, :] = x[n, g, :] @ weight[g].T + bias[g]``. Each owns leaf copies of
its parameters (so gradients land on them) and reports its gradients in the common
``(G, O, K)`` / ``(G, O)`` form for the correctness check.

Every formulation builds on the device and in the dtype of the ``weight`` it is given
(``tvmgroup bench --device/--dtype``); :attr:`Formulation.devices` says where it runs at all.

Inputs come in one of two layouts (``tvmgroup bench --layout`` picks the set of
formulations, :data:`BY_LAYOUT`): ``"last"``, ``x`` is ``(N, G*K)`` and ``y`` is ``(N, G*O)``
(features last, as for ``nn.Linear``); ``"conv"``, ``x`` is ``(1, G*K, N)`` and ``y`` is
``(1, G*O, N)`` (channels first, the natural ``nn.Conv1d`` layout: N is its length axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvmgroup.bench.shapes import Shape
from tvmgroup.layouts import LAYOUTS
from tvmgroup.opdefs import reference_pass

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
    """``tvmgroup.GroupedLinear(layout="last")``; its first call of a shape compiles kernels."""

    layout = "last"

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        from tvmgroup import GroupedLinear

        groups, out_features, in_features = weight.shape
        self.layer = GroupedLinear(groups, in_features, out_features, layout=self.layout,
                                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.layer.weight.copy_(weight)
            self.layer.bias.copy_(bias)

    def __call__(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def parameters(self) -> list[Tensor]:
        return [self.layer.weight, self.layer.bias]

    def grads(self) -> tuple[Tensor, Tensor]:
        return self.layer.weight.grad, self.layer.bias.grad


class TvmGroupConv(TvmGroup):
    """``tvmgroup.GroupedLinear(layout="conv")`` on ``(1, G*K, N)``, as ``nn.Conv1d`` takes it."""

    layout = "conv"


class MatmulConv(Combined):
    """``torch.matmul`` of ``W (G, O, K)`` with the input viewed as ``(B, G, K, L)``, + bias."""

    def __call__(self, x: Tensor) -> Tensor:
        groups, out_features, in_features = self.weight.shape
        b, _, length = x.shape
        y = torch.matmul(self.weight, x.view(b, groups, in_features, length)) + self.bias.unsqueeze(-1)
        return y.view(b, groups * out_features, length)


# -- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Formulation:
    name: str
    description: str
    build: Callable[[Tensor, Tensor], Instance]
    layout: str = "last"
    is_tvmgroup: bool = False
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
    )
}

# What a run times for each input layout (``tvmgroup bench --layout``): the "last" run keeps
# nn.Conv1d as a PyTorch formulation of the same layer; the "conv" run times everything on
# the channels-first (1, G*K, N) input.
BY_LAYOUT: dict[str, tuple[str, ...]] = {
    "last": ("linear-loop", "conv1d", "bmm", "einsum", "vmap", "compile-bmm", "block-diag", "tvmgroup"),
    "conv": ("conv1d", "matmul-conv", "tvmgroup-conv"),
}

# What a GPU run adds to the layout's set: the GPU-only PyTorch formulations.
EXTRA_ON_DEVICE: dict[tuple[str, str], tuple[str, ...]] = {
    ("last", "cuda"): ("autotune-bmm", "grouped-mm"),
}


def select(names: str | None, layout: str = "last", device: str = "cpu") -> list[Formulation]:
    """The formulations named in a comma-separated list (for None, those of the ``layout``
    run, :data:`BY_LAYOUT`, plus :data:`EXTRA_ON_DEVICE` for ``device``), in registry order."""
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
    return [f for name, f in FORMULATIONS.items() if name in wanted]


# -- layouts and the float64 reference ---------------------------------------------------------


def to_layout(x: Tensor, layout: str) -> Tensor:
    """An (N, F) tensor in ``layout``, contiguous: (N, F) itself or (1, F, N)."""
    if layout == "last":
        return x
    return x.t().contiguous().unsqueeze(0)


def from_layout(y: Tensor, layout: str) -> Tensor:
    """A tensor in ``layout`` back as (N, F) (a view)."""
    if layout == "last":
        return y
    return y[0].t()


def reference(x: Tensor, weight: Tensor, bias: Tensor, grad_y: Tensor) -> dict[str, Tensor]:
    """y, grad_x, grad_weight, grad_bias of (N, F) tensors in float64, from the ops' references."""
    return reference_pass(LAYOUTS["last"], x, weight, bias, grad_y)


def run_once(inst: Instance, layout: str, x: Tensor, grad_y: Tensor) -> dict[str, Tensor]:
    """One forward without autograd, one forward+backward; results as (N, F), (G, O, K), (G, O)."""
    with torch.no_grad():
        y_inference = from_layout(inst(to_layout(x, layout)), layout).clone()
    xl = to_layout(x, layout).detach().clone().requires_grad_(True)
    inst.zero_grad()
    y = inst(xl)
    y.backward(to_layout(grad_y, layout))
    grad_weight, grad_bias = inst.grads()
    return {
        "y": y_inference,
        "y_autograd": from_layout(y.detach(), layout),
        "grad_x": from_layout(xl.grad, layout),
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
