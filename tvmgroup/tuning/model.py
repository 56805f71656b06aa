"""Tuning every op shape of a model: discovery, then one tuning run per distinct op shape.

:func:`tune_model` finds the model's tvmgroup layers and the row counts they see on example
inputs (:mod:`tvmgroup.discovery`), and tunes each distinct op shape once, at the largest
row count seen (rounded up to the target's row multiple), under one progress bar. Every
run resumes its own log, so running the same job again continues where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import tvm
from tqdm import tqdm

from tvmgroup.discovery import OpShape, find_layers, op_shapes
from tvmgroup.paths import user_logs_dir
from tvmgroup.target import family_of, target_for_device
from tvmgroup.tuning.tune import TuneRequest, TuneResult, tune_op, tuning_rows


@dataclass(frozen=True)
class ModelTuneResult:
    shape: OpShape
    request: TuneRequest
    result: TuneResult


def plan(shapes: list[OpShape], target: tvm.target.Target | None, trials: int, root: Path,
         **options) -> list[tuple[OpShape, TuneRequest]]:
    """One :class:`TuneRequest` per distinct op shape; ``target`` None: each shape's device's
    target on this machine. Shapes in a dtype the target does not run are left out."""
    requests: list[tuple[OpShape, TuneRequest]] = []
    for shape in shapes:
        tgt = target if target is not None else target_for_device(shape.device)
        family = family_of(tgt)
        if shape.spec.dtype not in {str(d).removeprefix("torch.") for d in family.dtypes}:
            continue
        req = TuneRequest(shape.spec, tgt, tuning_rows(max(shape.rows), tgt), trials, Path(root), **options)
        if all(r.path != req.path for _, r in requests):
            requests.append((shape, req))
    return requests


def tune_model(
    model: torch.nn.Module,
    inputs: Any,
    *,
    target: tvm.target.Target | None = None,
    trials: int = 64,
    root: Path | None = None,
    backward: bool = True,
    progress: bool = True,
    on_done: Callable[[ModelTuneResult], None] | None = None,
    **options,
) -> list[ModelTuneResult]:
    """Tunes every op shape ``model`` runs on ``inputs`` (a tensor or a tuple of arguments).

    ``backward``: the gradient ops a training step runs too. ``options``: the other fields
    of :class:`TuneRequest` (``space``, ``keep``, ``seed``, ``trials_per_iter``, ``rpc``).
    """
    shapes = op_shapes(find_layers(model, inputs), backward=backward)
    requests = plan(shapes, target, trials, Path(root) if root is not None else user_logs_dir(), **options)
    results = []
    total = sum(r.trials for _, r in requests)
    with tqdm(total=total, unit="trial", disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
        for shape, req in requests:
            base = bar.n
            result = tune_op(req, progress=progress, bar=bar)
            bar.update(base + req.trials - bar.n)  # an exhausted space or a finished log fills its share
            done = ModelTuneResult(shape, req, result)
            results.append(done)
            if on_done is not None:
                on_done(done)
    return results
