"""The timing method: warm-up calls, then one timed sample per call, summarised by the median.

Each call gets the next of several input buffers in turn, so no call finds its input left in
cache by the call before. The median resists the outliers a shared machine produces; the
minimum and the inter-quartile range come with it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass
class Timing:
    """Samples in milliseconds and their summary."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def q1_ms(self) -> float:
        return self._quartiles()[0]

    @property
    def q3_ms(self) -> float:
        return self._quartiles()[2]

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = self._quartiles()
        return q3 - q1

    def _quartiles(self) -> tuple[float, float, float]:
        if len(self.samples_ms) < 2:
            only = self.samples_ms[0]
            return only, only, only
        q1, q2, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q1, q2, q3

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "q1_ms": self.q1_ms,
            "q3_ms": self.q3_ms,
            "iqr_ms": self.iqr_ms,
            "samples_ms": self.samples_ms,
        }


class Timer(Protocol):
    """Times one call of ``fn`` in seconds, including any work it leaves queued on a device."""

    def __call__(self, fn: Callable[[], object]) -> float: ...


class CpuTimer:
    """Wall-clock time of a synchronous CPU call."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def __call__(self, fn: Callable[[], object]) -> float:
        start = self.clock()
        fn()
        return self.clock() - start


class CudaTimer:
    """Device time of a call that queues GPU work: CUDA events recorded on the current stream
    before and after it, then a synchronise on the second.

    The host returns from a CUDA call before its kernels finish, so a wall clock would time the
    launch, not the work. ``event_class`` is ``torch.cuda.Event`` (injectable for tests).
    """

    def __init__(self, event_class: Callable[..., object] | None = None) -> None:
        if event_class is None:
            import torch

            event_class = torch.cuda.Event
        self.event_class = event_class

    def __call__(self, fn: Callable[[], object]) -> float:
        start = self.event_class(enable_timing=True)
        end = self.event_class(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def timer_for(device: str) -> Timer:
    """The timer for ``device``: wall clock on the CPU, CUDA events on a GPU."""
    if device == "cpu":
        return CpuTimer()
    if device == "cuda":
        return CudaTimer()
    raise ValueError(f"no timer for device {device!r}; expected 'cpu' or 'cuda'")


def time_calls(
    step: Callable[[int], object], *, warmup: int, repeats: int, timer: Timer | None = None
) -> Timing:
    """Calls ``step(i)`` for ``warmup`` untimed then ``repeats`` timed calls, ``i`` counting up
    from 0 across both (the caller picks its input buffer with ``i % buffers``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    timer = timer or CpuTimer()
    for i in range(warmup):
        step(i)
    samples = []
    for i in range(warmup, warmup + repeats):
        samples.append(timer(lambda i=i: step(i)) * 1e3)
    return Timing(samples)


def median_block_ms(fn: Callable[[], object], block_s: float = 0.12) -> float:
    """Median ms of the calls of ``fn`` made in ``block_s`` seconds after 3 untimed ones: one
    sample of an interleaved A/B round (the scripts' kernel comparisons)."""
    for _ in range(3):
        fn()
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < block_s:
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples) * 1e3
