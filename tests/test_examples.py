"""The ports in examples/ against their original PyTorch formulations: outputs, losses,
gradients and parameters after a few Adam steps, with the original run in float64."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    """The example as ``python examples/<name>.py`` runs it: its directory first on sys.path
    (where it finds ``example_timing``) while it is imported."""
    spec = importlib.util.spec_from_file_location(f"tvmgroup_examples_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES_DIR))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES_DIR))
    return module


@dataclass
class Case:
    """How to build, feed and train one example at test sizes."""

    original: Callable  # module -> the original model
    port: str  # the port's class name in the module
    data: Callable  # () -> tuple of input tensors (float32)
    loss: str  # the loss function's name in the module: loss(model, *data)
    timing: dict  # the same sizes for time_forward_backward (kernels already compiled)


CASES = {
    "ensemble_critic": Case(
        original=lambda m: m.VectorizedCritic(5, 3, hidden=16, members=5),
        port="GroupedCritic",
        data=lambda: (torch.randn(6, 5), torch.randn(6, 3), torch.randn(6)),
        loss="critic_loss",
        timing=dict(members=5, hidden=16, batch=6, state_dim=5, action_dim=3),
    ),
    "timeseries_head": Case(
        original=lambda m: m.DLinear(seq_len=24, pred_len=6, channels=5, kernel_size=5),
        port="GroupedDLinear",
        data=lambda: (torch.randn(4, 24, 5), torch.randn(4, 6, 5)),
        loss="forecast_loss",
        timing=dict(batch=4, seq_len=24, pred_len=6, channels=5),
    ),
    "block_diagonal_mlp": Case(
        original=lambda m: m.PackedMLP(in_features=12, hidden=16, classes=5, blocks=4),
        port="GroupedMLP",
        data=lambda: (torch.randn(8, 12), torch.randint(5, (8,))),
        loss="classification_loss",
        timing=dict(batch=8, in_features=12, hidden=16, classes=5),
    ),
}


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    err = (got.detach().double() - want.detach()).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), f"{what}: error {err:.3e}"


def _double(data: tuple) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in data)


def _models(name: str):
    module, case = _load(name), CASES[name]
    original = case.original(module)
    port = getattr(module, case.port).from_original(original)
    return module, case, original.double(), port


def _as_port(module: ModuleType, original64: torch.nn.Module, attr: str = "data") -> dict[str, torch.Tensor]:
    """The original's parameters (``attr="data"``) or gradients (``"grad"``) in the port's
    names and shapes, through the example's own ``ported_state``."""
    view = copy.deepcopy(original64)
    for p, q in zip(view.parameters(), original64.parameters()):
        value = getattr(q, attr)
        p.data = value if value is not None else torch.zeros_like(q)
    return module.ported_state(view)


@pytest.mark.parametrize("name", list(CASES))
def test_port_has_the_original_parameters(name):
    module, _, original64, port = _models(name)
    state = _as_port(module, original64)
    assert set(state) == {n for n, _ in port.named_parameters()}
    assert sum(p.numel() for p in port.parameters()) == sum(p.numel() for p in original64.parameters())
    for n, p in port.named_parameters():
        assert torch.equal(p.detach().double(), state[n]), n


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_loss_and_gradients_match_the_original(name):
    module, case, original64, port = _models(name)
    data = case.data()
    inputs = data[:2] if name == "ensemble_critic" else data[:1]
    _close(port(*inputs), original64(*_double(inputs)), 1e-5, "output")
    loss_fn = getattr(module, case.loss)
    loss, loss64 = loss_fn(port, *data), loss_fn(original64, *_double(data))
    _close(loss, loss64, 1e-5, "loss")
    loss.backward()
    loss64.backward()
    grads = _as_port(module, original64, "grad")
    for n, p in port.named_parameters():
        assert grads[n].abs().max() > 0, f"{n}: the original's gradient is zero"
        _close(p.grad, grads[n], 1e-4, f"grad {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_adam_steps_match_the_original(name):
    module, case, original64, port = _models(name)
    loss_fn = getattr(module, case.loss)
    batches = [case.data() for _ in range(3)]
    before = {n: t.clone() for n, t in _as_port(module, original64).items()}
    for model, cast in ((port, lambda d: d), (original64, _double)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for data in batches:
            optimizer.zero_grad()
            loss_fn(model, *cast(data)).backward()
            optimizer.step()
    after = _as_port(module, original64)
    moved = max((after[n] - p0).abs().max().item() for n, p0 in before.items())
    assert moved > 1e-3  # the steps did move the parameters
    for n, p in port.named_parameters():
        _close(p, after[n], 1e-4, f"{n} after 3 Adam steps")


def test_ensemble_critic_diversity_term_needs_the_double_backward():
    """The diversity loss alone reaches every weight through gradients of gradients."""
    module, case, original64, port = _models("ensemble_critic")
    state, action, _ = case.data()
    module.diversity_loss(port, state, action).backward()
    module.diversity_loss(original64, state.double(), action.double()).backward()
    grads = _as_port(module, original64, "grad")
    for n, p in port.named_parameters():
        if n.endswith("bias"):  # with ReLUs, dQ/da is piecewise constant in the biases
            assert grads[n].abs().max() == 0
            assert p.grad is None or p.grad.abs().max() == 0, n
            continue
        assert grads[n].abs().max() > 0, n
        _close(p.grad, grads[n], 1e-4, f"diversity grad {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_timing_function_runs_both_formulations(name):
    """Only that it runs (timings are measured by hand, never asserted on)."""
    times = _load(name).time_forward_backward(**CASES[name].timing, calls=1, warmup=1)
    assert set(times) == {"original", "tvmgroup"} and all(t > 0 for t in times.values())


@pytest.mark.parametrize("name", list(CASES))
def test_runs_as_a_script(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    _load(name).main()
    assert capsys.readouterr().out.strip()


def test_timing_helper_counts_warmup_and_timed_calls():
    sys.path.insert(0, str(EXAMPLES_DIR))
    try:
        import example_timing
    finally:
        sys.path.remove(str(EXAMPLES_DIR))
    calls = []
    assert example_timing.median_seconds(lambda: calls.append(1), calls=5, warmup=2) >= 0
    assert len(calls) == 7


@pytest.mark.parametrize("name", list(CASES))
def test_runs_as_a_script_from_the_repository_root(name):
    root = EXAMPLES_DIR.parent
    done = subprocess.run([sys.executable, f"examples/{name}.py"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
