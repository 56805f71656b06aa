"""Which schedule serves an op (:class:`ScheduleChoice`), and the default ones.

A choice is made by :mod:`tvmgroup.lookup` (from a tuning log via :mod:`tvmgroup.replay`,
or the template's default) and compiled by :mod:`tvmgroup.kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tvm
from tvm import s_tir

from tvmgroup.compute import OpSpec
from tvmgroup.schedules import DefaultKnobs
from tvmgroup.target import family_of

# Applies a schedule to ``sch``, which holds the op with symbolic rows.
ScheduleFn = Callable[[s_tir.Schedule], None]


@dataclass(frozen=True)
class ScheduleChoice:
    """Which schedule serves an op: where it came from and how to apply it."""

    origin: str  # "user", "shipped" or "default"
    apply: ScheduleFn
    fingerprint: str  # changes whenever the schedule does; part of the disk-cache key
    log: str | None = None
    tuned_rows: int | None = None
    note: str | None = None


def default_choice(spec: OpSpec, target: tvm.target.Target) -> ScheduleChoice:
    """The family template's default schedule."""
    template = family_of(target).template()

    def apply(sch: s_tir.Schedule) -> None:
        template(sch, spec.op, spec.layout, spec.bias, DefaultKnobs())

    return ScheduleChoice("default", apply, fingerprint="default")


def simt_choice(spec: OpSpec, target: tvm.target.Target, note: str) -> ScheduleChoice:
    """The CUDA SIMT template's default schedule, for any dtype: the tensor cores' fallback."""
    from tvmgroup.schedules.cuda_simt import schedule_simt

    def apply(sch: s_tir.Schedule) -> None:
        schedule_simt(sch, spec.op, spec.layout, spec.bias, DefaultKnobs())

    return ScheduleChoice("default", apply, fingerprint="default-simt", note=note)
