"""Knobs: how a schedule template picks its tile sizes.

One template serves several purposes. With :class:`DefaultKnobs` it is the untuned default
schedule; with :class:`SampledKnobs` every choice is a MetaSchedule sampling instruction, so
the template is a MetaSchedule design space; :class:`DefaultTraceKnobs` is the default as a
trace of that space; with :class:`ReplayKnobs` it makes the same choices as a tuned trace, on
any compute of the same op (tuning runs at a fixed row count, kernels take any).
"""

from __future__ import annotations

from typing import Sequence

from tvm import s_tir

# The instructions a template's knobs emit, in the order the template calls them.
SAMPLING_INSTRUCTIONS = ("SamplePerfectTile", "SampleCategorical")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Knobs:
    """Interface: factors for splitting loops."""

    def perfect_tile(self, sch: s_tir.Schedule, loop, n: int, limit: int, default: Sequence[int]) -> list:
        """``n`` factors of a static loop's extent (the first is the outer loop); each inner
        factor is at most ``limit``. ``default`` holds the inner factors the default wants."""
        raise NotImplementedError

    def inner_static(self, sch: s_tir.Schedule, loop, extent: int, limit: int, default: int):
        """Inner factor of a loop with a static extent (always divides it)."""
        raise NotImplementedError

    def inner_choice(self, sch: s_tir.Schedule, candidates: Sequence[int], default: int):
        """Inner factor picked from candidates (for symbolic loops: the tail is predicated)."""
        raise NotImplementedError


class DefaultKnobs(Knobs):
    """Fixed, hand-picked choices: the default schedule."""

    def perfect_tile(self, sch, loop, n, limit, default):
        rest = int(sch.get(loop).extent)
        inner: list[int] = []
        for want in reversed(list(default)[-(n - 1):]):
            factor = max(d for d in _divisors(rest) if d <= min(want, limit))
            inner.insert(0, factor)
            rest //= factor
        return [rest, *inner]

    def inner_static(self, sch, loop, extent, limit, default):
        # Power-of-two factors: other vector lengths compile to gathers.
        bound = min(limit, default)
        return max(d for d in _divisors(extent) if d <= bound and d & (d - 1) == 0)

    def inner_choice(self, sch, candidates, default):
        return default


class SampledKnobs(Knobs):
    """MetaSchedule sampling instructions: the tuning search space."""

    def _decision(self, default_decision):
        """The decision to record (None: sample one); ``default_decision()`` is the default's."""
        return None

    def perfect_tile(self, sch, loop, n, limit, default):
        decision = self._decision(lambda: DefaultKnobs().perfect_tile(sch, loop, n, limit, default))
        return sch.sample_perfect_tile(loop, n=n, max_innermost_factor=limit, decision=decision)

    def inner_static(self, sch, loop, extent, limit, default):
        def default_decision():
            factor = DefaultKnobs().inner_static(sch, loop, extent, limit, default)
            return [extent // factor, factor]

        decision = self._decision(default_decision)
        return sch.sample_perfect_tile(loop, n=2, max_innermost_factor=limit, decision=decision)[1]

    def inner_choice(self, sch, candidates, default):
        candidates = list(candidates)
        probs = [1.0 / len(candidates)] * len(candidates)
        decision = self._decision(lambda: candidates.index(default))
        return sch.sample_categorical(candidates, probs, decision=decision)


class DefaultTraceKnobs(SampledKnobs):
    """The default schedule as a point of the design space: sampling instructions whose
    decisions are the defaults. Tuning measures it first, so a log never loses to it."""

    def _decision(self, default_decision):
        return default_decision()


def trace_decisions(trace: s_tir.Trace) -> list:
    """The decisions of a trace's sampling instructions, in order."""
    insts = [inst for inst in trace.insts if inst.kind.name in SAMPLING_INSTRUCTIONS]
    return [_plain(trace.decisions[inst]) for inst in insts]


def _plain(decision):
    """An FFI decision as Python ints (a tile's factors, or a categorical index)."""
    if hasattr(decision, "__len__"):
        return [int(v) for v in decision]
    return int(decision)


class ReplayKnobs(SampledKnobs):
    """The sampling instructions of :class:`SampledKnobs`, with a tuned trace's decisions.

    Raises :class:`ValueError` when the template asks for more choices than the trace made;
    :meth:`check_used_all` tells whether it asked for fewer.
    """

    def __init__(self, decisions: Sequence) -> None:
        self._decisions = list(decisions)
        self._next = 0

    @classmethod
    def from_trace(cls, trace: s_tir.Trace) -> "ReplayKnobs":
        return cls(trace_decisions(trace))

    def _decision(self, default_decision):
        if self._next >= len(self._decisions):
            raise ValueError(f"the template makes more choices than the trace's {len(self._decisions)}")
        self._next += 1
        return self._decisions[self._next - 1]

    def check_used_all(self) -> None:
        if self._next != len(self._decisions):
            raise ValueError(f"the template made {self._next} choices, the trace {len(self._decisions)}")
