"""Schedule templates, one per target family, and the registry that picks one.

Each template is a function ``(sch, op, layout, bias, knobs, tail) -> None``; with
:class:`~schedules.knobs.DefaultKnobs` it is the default schedule, with
:class:`~schedules.knobs.SampledKnobs` a MetaSchedule design space, with
:class:`~schedules.knobs.ReplayKnobs` a tuned schedule. ``cuda`` dispatches on the dtype:
tensor cores (``cuda_tensorcore``) for float16/bfloat16, SIMT (``cuda_simt``) for float32.
"""

from __future__ import annotations

from typing import Callable

from .cpu import schedule_cpu
from .cuda import schedule_cuda
from .knobs import DefaultKnobs, DefaultTraceKnobs, Knobs, ReplayKnobs, SampledKnobs, trace_decisions
from .roles import ROW_TILE_KEY, row_tile_of

TEMPLATES: dict[str, Callable[..., None]] = {"llvm": schedule_cpu, "cuda": schedule_cuda}


def template_for(target_kind: str) -> Callable[..., None]:
    try:
        return TEMPLATES[target_kind]
    except KeyError:
        raise ValueError(f"no schedule template for target kind {target_kind!r}; have {sorted(TEMPLATES)}") from None


__all__ = ["TEMPLATES", "template_for", "Knobs", "DefaultKnobs", "DefaultTraceKnobs", "SampledKnobs", "ReplayKnobs", "trace_decisions", "ROW_TILE_KEY", "row_tile_of"]
