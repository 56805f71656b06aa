"""Schedule templates, one per target family, and the registry that picks one.

Each template is a function ``(sch, op, layout, bias, knobs, tail) -> None``; with
:class:`~schedules.knobs.DefaultKnobs` it is the default schedule, with
:class:`~schedules.knobs.SampledKnobs` a MetaSchedule design space, with
:class:`~schedules.knobs.ReplayKnobs` a tuned schedule. ``cuda`` dispatches on the dtype:
tensor cores (``cuda_tensorcore``) for float16/bfloat16, SIMT (``cuda_simt``) for float32.
"""

from __future__ import annotations

from typing import Callable

from .cpu import FUSED_BACKWARD_LAYOUTS, cpu_structures, schedule_cpu
from .cuda import schedule_cuda
from .knobs import DefaultKnobs, DefaultTraceKnobs, Knobs, ReplayKnobs, SampledKnobs, trace_decisions, trace_structure
from .roles import ROW_TILE_KEY, STRUCTURE_KEY, row_tile_of

TEMPLATES: dict[str, Callable[..., None]] = {"llvm": schedule_cpu, "cuda": schedule_cuda}

SINGLE_OPS = ("forward", "grad_input", "grad_weight")  # every template schedules these, on every layout
# What each template schedules beyond the single ops: op -> the layouts it has a schedule
# for. The fused backward is a CPU schedule only (the CUDA templates schedule one main block
# per kernel); where it is missing, the backward pass runs grad_input and grad_weight.
EXTRA_OPS: dict[str, dict[str, frozenset[str]]] = {
    "llvm": {"backward": FUSED_BACKWARD_LAYOUTS},
    "cuda": {},
}


# Each template's loop structures for an op on a layout, the default first (knobs.Knobs.structure);
# a template without an entry has one structure for every op.
STRUCTURES: dict[str, Callable[[str, str], tuple[str, ...]]] = {"llvm": cpu_structures}


def structures(target_kind: str, op: str, layout: str) -> tuple[str, ...]:
    """The names of the loop structures the template of ``target_kind`` has for ``op`` on
    ``layout``: one design space each, the first the default's."""
    names = STRUCTURES.get(target_kind)
    return names(op, layout) if names is not None else ("default",)


def supports(target_kind: str, op: str, layout: str) -> bool:
    """Whether the template of ``target_kind`` schedules ``op`` on kernel layout ``layout``.

    A layout a template does not name for an extra op (a new layout, say) is not supported
    there, so callers fall back to the single ops instead of failing.
    """
    if target_kind not in TEMPLATES:
        return False
    return op in SINGLE_OPS or layout in EXTRA_OPS.get(target_kind, {}).get(op, frozenset())


def template_for(target_kind: str) -> Callable[..., None]:
    try:
        return TEMPLATES[target_kind]
    except KeyError:
        raise ValueError(f"no schedule template for target kind {target_kind!r}; have {sorted(TEMPLATES)}") from None


__all__ = ["TEMPLATES", "SINGLE_OPS", "EXTRA_OPS", "STRUCTURES", "structures", "supports", "template_for", "Knobs",
           "DefaultKnobs", "DefaultTraceKnobs", "SampledKnobs", "ReplayKnobs", "trace_decisions", "trace_structure",
           "ROW_TILE_KEY", "STRUCTURE_KEY", "row_tile_of"]
