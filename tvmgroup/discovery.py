"""Finding the tvmgroup layers of a model and the op shapes they run on example inputs.

The model runs once on the example inputs with a forward pre-hook on every
:class:`~tvmgroup.layer.GroupedLinear`; each call records the layer's shape, layout, dtype,
device and the row count it sees. The run is under torch's ``FakeTensorMode``, so nothing
is computed and no kernel is compiled (the ops' fake implementations give the shapes). A
model that cannot run on fake tensors (data-dependent control flow, ``.item()``) runs for
real instead, once, which compiles its forward kernels as its first real call would.

From the calls, :func:`op_shapes` derives the ops a training step runs: ``forward`` always,
``backward`` (the fused one) where the layer's input and its parameters require grad and the
device and layout have it (:func:`tvmgroup.ops.fuses_backward`), else ``grad_input`` where
the input requires grad and ``grad_weight`` where the parameters do. :mod:`tvmgroup.prebuild` compiles their kernels; ``tvmgroup tune --model`` tunes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from tvmgroup.compute import OpSpec
from tvmgroup.layer import GroupedLinear
from tvmgroup.layouts import SHARED_INPUTS, kernel_layout_of
from tvmgroup.ops import fuses_backward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCall:
    """One call of a tvmgroup layer seen on the example inputs."""

    name: str  # the module's path in the model ("" for the model itself)
    groups: int
    in_features: int
    out_features: int
    layout: str
    bias: bool
    dtype: str
    device: str  # torch device type: "cpu", "cuda"
    rows: int  # rows of the call (batch-like dims multiplied out)
    input_requires_grad: bool
    weight_requires_grad: bool  # weight or bias
    weight_layout: str = "out_in"  # how the layer stores its weight (tvmgroup.weights)


@dataclass(frozen=True)
class OpShape:
    """A distinct op shape a model runs, and every row count it was seen with."""

    spec: OpSpec
    device: str
    rows: tuple[int, ...]  # sorted, distinct
    layers: tuple[str, ...]  # names of the layers that run it


def _record(name: str, calls: list[LayerCall]):
    def hook(module: GroupedLinear, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return  # the layer's own input check will say what is wrong
        x = args[0]
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        per_row = module.in_features if module.layout in SHARED_INPUTS else module.groups * module.in_features
        rows = x.numel() // per_row if x.numel() else 0  # a shared input is read by every group
        calls.append(LayerCall(
            name, module.groups, module.in_features, module.out_features, module.layout,
            module.bias is not None, str(x.dtype).removeprefix("torch."), x.device.type, rows,
            bool(x.requires_grad) and torch.is_grad_enabled(),
            any(p.requires_grad for p in params) and torch.is_grad_enabled(),
            module.weight_layout,
        ))

    return hook


def _as_args(inputs: Any) -> tuple:
    """Example inputs as positional arguments: a tensor, or a tuple/list of arguments."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    return (inputs,)


def find_layers(model: torch.nn.Module, inputs: Any, *, fake: bool = True) -> list[LayerCall]:
    """Every call of a tvmgroup layer when ``model`` runs on ``inputs``, in call order.

    ``inputs``: one tensor, or a tuple/list of positional arguments (tensors may be nested
    in lists, tuples and dicts). ``fake=False`` runs the model for real (its forward kernels
    compile); with ``fake=True`` a model that fails on fake tensors runs for real too.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = _as_args(inputs)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GroupedLinear)]
    calls: list[LayerCall] = []
    handles = [m.register_forward_pre_hook(_record(name, calls)) for name, m in layers]
    try:
        if fake:
            try:
                _run_fake(model, args)
                return calls
            except Exception as err:  # data-dependent code: fall back to one real run
                log.info("tvmgroup: the model does not run on fake tensors (%s); running it for real", err)
                calls.clear()
        model(*args)
        return calls
    finally:
        for handle in handles:
            handle.remove()


def _run_fake(model: torch.nn.Module, args: tuple) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
        model(*fake_args)


def op_shapes(calls: Sequence[LayerCall], *, backward: bool = True) -> list[OpShape]:
    """The distinct op shapes the calls run: forward, and with ``backward`` the gradient ops
    their inputs and parameters need. Calls with no rows run no kernel and are left out."""
    found: dict[tuple[OpSpec, str], tuple[set[int], list[str]]] = {}

    def add(op: str, call: LayerCall, bias: bool) -> None:
        # A shared input runs on its kernel layout's kernels (the input expanded over the groups).
        layout = kernel_layout_of(call.layout)
        spec = OpSpec(op, call.groups, call.in_features, call.out_features, call.dtype, layout, bias,
                      call.weight_layout)
        rows, names = found.setdefault((spec, call.device), (set(), []))
        rows.add(call.rows)
        if call.name not in names:
            names.append(call.name)

    for call in calls:
        if call.rows == 0:
            continue
        add("forward", call, call.bias)
        if not backward:
            continue
        kernel_layout = kernel_layout_of(call.layout)
        if call.input_requires_grad and call.weight_requires_grad and fuses_backward(call.device, kernel_layout):
            add("backward", call, call.bias)  # what the backward pass runs then (tvmgroup.ops)
            continue
        if call.input_requires_grad:
            add("grad_input", call, False)
        if call.weight_requires_grad:
            add("grad_weight", call, call.bias)
    return [OpShape(spec, device, tuple(sorted(rows)), tuple(names)) for (spec, device), (rows, names) in found.items()]


def load_factory(text: str):
    """``MODULE:FACTORY`` -> the callable; MODULE is an importable module or a ``.py`` file."""
    import importlib
    import importlib.util
    from pathlib import Path

    module_name, sep, attr = text.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be MODULE:FACTORY (e.g. mypkg.models:make or models.py:make), got {text!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--model {text}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"_tvmgroup_model_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"--model {text}: cannot import {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {text}: {module_name} has no callable {attr!r}")
    return factory


def model_from_factory(text: str) -> tuple[torch.nn.Module, tuple]:
    """Calls the factory named by ``MODULE:FACTORY``; it returns ``(model, example_inputs)``."""
    made = load_factory(text)()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise ValueError(
            f"--model {text}: the factory must return (torch.nn.Module, example inputs), got {type(made).__name__}"
        )
    return made[0], _as_args(made[1])
