"""Schedule templates, one per target family, and the registry that picks one.

Each template is a function ``(sch, op, layout, bias, knobs, tail) -> row_tile``; with
:class:`~schedules.knobs.DefaultKnobs` it is the default schedule, with
:class:`~schedules.knobs.SampledKnobs` a MetaSchedule design space.
"""

from __future__ import annotations

from typing import Callable

from .cpu import schedule_cpu
from .cuda import schedule_cuda
from .knobs import DefaultKnobs, Knobs, SampledKnobs

TEMPLATES: dict[str, Callable[..., int]] = {"llvm": schedule_cpu, "cuda": schedule_cuda}


def template_for(target_kind: str) -> Callable[..., int]:
    try:
        return TEMPLATES[target_kind]
    except KeyError:
        raise ValueError(f"no schedule template for target kind {target_kind!r}; have {sorted(TEMPLATES)}") from None


__all__ = ["TEMPLATES", "template_for", "Knobs", "DefaultKnobs", "SampledKnobs"]
