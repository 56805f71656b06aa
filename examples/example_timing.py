"""The timing the examples' ``--time`` runs: the median wall time of a forward and backward
pass of each formulation of a model, after a few untimed calls. Measured by hand; the tests
only check that it runs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tvmgroup.bench.timing import time_calls


def median_seconds(step: Callable[[], object], calls: int, warmup: int) -> float:
    """Median seconds of ``calls`` timed calls of ``step`` after ``warmup`` untimed ones."""
    return time_calls(lambda _: step(), warmup=warmup, repeats=calls).median_ms / 1e3


def forward_backward_seconds(
    models: dict[str, nn.Module], loss: Callable[[nn.Module], torch.Tensor], calls: int, warmup: int
) -> dict[str, float]:
    """Per model, the median seconds of ``loss(model).backward()`` (gradients reset to None
    before each call, so none accumulate)."""

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        loss(model).backward()

    return {name: median_seconds(lambda: step(model), calls, warmup) for name, model in models.items()}
