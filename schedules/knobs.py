"""Knobs: how a schedule template picks its tile sizes.

One template serves two purposes. With :class:`DefaultKnobs` it is the untuned default
schedule; with :class:`SampledKnobs` every choice is a MetaSchedule sampling instruction, so
the template is a MetaSchedule design space whose best trace can be saved and replayed.
"""

from __future__ import annotations

from typing import Sequence

from tvm import s_tir


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Knobs:
    """Interface: a factor for splitting one loop in two."""

    def inner_static(self, sch: s_tir.Schedule, loop, extent: int, limit: int, default: int):
        """Inner factor of a loop with a static extent (always divides it)."""
        raise NotImplementedError

    def inner_choice(self, sch: s_tir.Schedule, candidates: Sequence[int], default: int):
        """Inner factor picked from candidates (for symbolic loops: the tail is predicated)."""
        raise NotImplementedError


class DefaultKnobs(Knobs):
    """Fixed, hand-picked choices: the default schedule."""

    def inner_static(self, sch, loop, extent, limit, default):
        # Power-of-two factors: other vector lengths compile to gathers.
        bound = min(limit, default)
        return max(d for d in _divisors(extent) if d <= bound and d & (d - 1) == 0)

    def inner_choice(self, sch, candidates, default):
        return default


class SampledKnobs(Knobs):
    """MetaSchedule sampling instructions: the tuning search space."""

    def inner_static(self, sch, loop, extent, limit, default):
        _, inner = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=limit)
        return inner

    def inner_choice(self, sch, candidates, default):
        candidates = list(candidates)
        probs = [1.0 / len(candidates)] * len(candidates)
        return sch.sample_categorical(candidates, probs)
