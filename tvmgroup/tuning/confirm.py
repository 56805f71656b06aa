"""Confirms a log's best schedule against the default, timed as the layer runs kernels.

The search times each candidate once, on MetaSchedule's runner: TVM's thread pool, buffers
of its own, one sample. The best of many single noisy samples favours a lucky one, and on a
2-core machine the tuned schedules it preferred by 1.07-1.40x ran 0.82-1.07x the default in
the layer (docs/performance.md, "Tuning"). So where a CPU log's best beat the default by the
search's numbers, both schedules are compiled for symbolic rows as lookup serves them (from
the kernel cache, on torch's threads), then timed at the tuned row count in interleaved
rounds of calls on rotating random inputs, alternating which goes first. The medians go into
the log's ``tvmgroup.json`` (``confirmed``, with the best record's digest), and lookup
decides by them (:func:`tvmgroup.logs.beats_default`).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import tvm

from tvmgroup.choice import default_choice
from tvmgroup.compute import OpSpec
from tvmgroup.kernel import KERNELS
from tvmgroup.logs import (
    CONFIRMED, BestRecord, Confirmation, TuningLog, best_beats, confirmation, default_seconds, read_meta, write_meta,
)
from tvmgroup.replay import choice_from_log
from tvmgroup.target import family_of

ROUNDS = 7  # rounds of one block of calls per schedule
BLOCK_SECONDS = 0.05  # the least time one block of calls runs
BLOCK_CALLS = 3  # ... and the fewest calls
BUFFERS = 3  # input sets the calls rotate through (none finds its input left in cache)


def needs_confirmation(log: TuningLog, best: BestRecord, target: tvm.target.Target) -> bool:
    """Whether ``log`` is a CPU log whose best record (``best``) beat the default by the
    search's own measurements (only then could lookup serve it) and has no usable
    confirmation of that record."""
    return (
        family_of(target).device_type == "cpu"
        and best_beats(best.seconds, default_seconds(log.meta))
        and confirmation(log.meta, best.digest) is None
    )


def time_interleaved(calls: dict[str, Callable[[int], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds per call of each of ``calls`` (``call(i)`` runs call number ``i``): each
    round runs a block of calls of every one in turn, the order reversed every other round;
    a block's per-call median is its sample."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for number in range(rounds):
        for name in names if number % 2 == 0 else reversed(names):
            call = calls[name]
            call(0)  # warm-up
            times, start, i = [], time.perf_counter(), 1
            while len(times) < BLOCK_CALLS or time.perf_counter() - start < BLOCK_SECONDS:
                begin = time.perf_counter()
                call(i)
                times.append(time.perf_counter() - begin)
                i += 1
            samples[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in samples.items()}


def confirm(
    log: TuningLog, best: BestRecord, spec: OpSpec, target: tvm.target.Target, rounds: int = ROUNDS
) -> Confirmation:
    """Times ``log``'s best schedule (its record ``best``) against the default (see the
    module's docstring) and records the result in the log's metadata."""
    choices = {
        "best": choice_from_log(spec, target, log, "user", only_if_faster=False),
        "default": default_choice(spec, target),
    }
    kernels = {name: KERNELS.get(spec, target, choice) for name, choice in choices.items()}
    operands = [spec.op_def.operands(spec, spec.layout_def, log.rows, torch.float32)[0] for _ in range(BUFFERS)]
    calls = {name: (lambda i, k=kernel: k(*operands[i % BUFFERS])) for name, kernel in kernels.items()}
    medians = time_interleaved(calls, rounds)
    result = Confirmation(best.digest, medians["best"], medians["default"])
    meta = read_meta(log.path)
    meta[CONFIRMED] = result.to_meta()
    write_meta(log.path, meta)
    log.meta = meta
    return result
