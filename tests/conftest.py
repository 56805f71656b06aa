"""Shared fixtures: a private TVMGROUP_HOME for the session, a seed per test, float64 references.

The references compute in float64 from the very float32 values the kernels see, so the only
error left is float32 rounding inside the kernels' sums. ``assert_close`` bounds it per
element by the classical bound for a sum of ``depth`` products, ``(depth + 1) * u * sum|a*b|``
(u = 2**-24), doubled for slack: any summation order passes, a missed or wrong term does not.
"""

from __future__ import annotations

import zlib
from typing import Callable

import pytest
import torch

from tvmgroup.layouts import layout_of
from tvmgroup.opdefs import reference_pass

UNIT_ROUNDOFF = 2.0**-24


@pytest.fixture(scope="session", autouse=True)
def tvmgroup_home(tmp_path_factory: pytest.TempPathFactory):
    """Points TVMGROUP_HOME at a temporary directory so tests never touch ~/.cache."""
    home = tmp_path_factory.mktemp("tvmgroup_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVMGROUP_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fixed but per-test seed: every test sees fresh, reproducible random inputs."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> torch.Tensor:
    """The grouped linear op in float64, from the forward op's own reference."""
    grad_y = torch.zeros(layout_of(layout).out_shape(x, weight.shape[0], weight.shape[1]))
    return reference_pass(layout_of(layout), x, weight, bias, grad_y)["y"]


def reference_grads(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad_y: torch.Tensor, layout: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Float64 (value, magnitude, depth) of y, grad_x, grad_weight and grad_bias.

    The magnitude is the same pass on absolute values: for a bilinear op, the sums over
    |x|, |weight|, |bias| and |grad_y| are exactly the sums of absolute terms.
    """
    g, o, k = weight.shape
    rows = grad_y.numel() // (g * o)
    lay = layout_of(layout)
    absolute = lambda t: t.abs() if t is not None else None  # noqa: E731
    value = reference_pass(lay, x, weight, bias, grad_y)
    mag = reference_pass(lay, x.abs(), weight.abs(), absolute(bias), grad_y.abs())
    names = {"y": "y", "x": "grad_x", "weight": "grad_weight", "bias": "grad_bias"}
    depth = {"y": k + 1, "x": o, "weight": rows, "bias": rows}
    return {name: (value[names[name]], mag[names[name]], depth[name]) for name in names}


def assert_close(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, depth: int, what: str = "") -> None:
    """Every element of ``got`` within the float32 rounding bound of a ``depth``-term sum."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    got64 = got.detach().double()
    assert torch.isfinite(got64).all(), f"{what}: non-finite elements (unwritten output?)"
    bound = 2 * (depth + 1) * UNIT_ROUNDOFF * mag + 1e-30
    err = (got64 - ref).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {err.max().item():.3e} exceeds the float32 bound ({worst:.2f}x)"


@pytest.fixture
def ref_grads() -> Callable:
    return reference_grads


@pytest.fixture
def ref() -> Callable:
    return reference


@pytest.fixture
def close() -> Callable:
    return assert_close


def make_inputs(
    groups: int, in_features: int, out_features: int, x_shape: tuple[int, ...], bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random float32 x, weight and bias (standard normal: never zeros)."""
    x = torch.randn(x_shape)
    weight = torch.randn(groups, out_features, in_features)
    b = torch.randn(groups, out_features) if bias else None
    return x, weight, b


@pytest.fixture
def inputs() -> Callable:
    return make_inputs


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A fresh, empty TVMGROUP_HOME for one test (for disk-cache tests)."""
    home = tmp_path / "home"
    monkeypatch.setenv("TVMGROUP_HOME", str(home))
    return home


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips ``gpu`` tests cleanly when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

