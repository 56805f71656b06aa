"""The search spaces a tuning run can explore.

``template``: the tvmgroup template with :class:`~tvmgroup.schedules.SampledKnobs`, so every
tile choice is a MetaSchedule sampling instruction and the template itself is the design
space (one per loop structure it has for the op, :func:`~tvmgroup.schedules.structures`); its
best trace replays onto the symbolic-row compute. ``generic``: MetaSchedule's
own default space for the target, for comparison (its traces are tied to the tuned row
count, so run-time lookup does not use them).
"""

from __future__ import annotations

import tvm
from tvm.s_tir import meta_schedule as ms

from tvmgroup.compute import OpSpec
from tvmgroup.schedules import SampledKnobs, structures
from tvmgroup.target import family_of

SPACES: tuple[str, ...] = ("template", "generic")


def _postprocs(target: tvm.target.Target) -> list:
    """The template emits final schedules; the family names the checks they still need
    (GPU code: a resource check)."""
    return [getattr(ms.postproc, name)() for name in family_of(target).postprocs]


def template_space(spec: OpSpec, target: tvm.target.Target) -> ms.space_generator.ScheduleFn:
    template = family_of(target).template()
    count = len(structures(target.kind.name, spec.op, spec.layout))

    def apply(sch: tvm.s_tir.Schedule) -> list[tvm.s_tir.Schedule]:
        spaces = [sch.copy() for _ in range(count)]
        for structure, space in enumerate(spaces):
            template(space, spec.op, spec.layout, spec.bias, SampledKnobs(structure))
        return spaces

    return ms.space_generator.ScheduleFn(apply, sch_rules=[], postprocs=_postprocs(target), mutator_probs="from-target")


def make_space(name: str, spec: OpSpec, target: tvm.target.Target):
    """The MetaSchedule space generator called ``name`` (one of :data:`SPACES`)."""
    if name == "template":
        return template_space(spec, target)
    if name == "generic":
        return "post-order-apply"
    raise ValueError(f"space must be one of {SPACES}, got {name!r}")
