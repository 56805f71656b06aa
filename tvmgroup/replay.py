"""A log's best trace as a schedule for the symbolic-row op.

Tuning runs the template at a fixed row count; the best trace's sampling decisions are fed
back to the same template (:class:`~tvmgroup.schedules.ReplayKnobs`) on the compute with a
symbolic row count. The template samples G/K/O tiles on static loops and row tiles
categorically, so the same decisions are valid there: one tuned log serves every N.
The row tile travels as a block annotation, which :func:`~tvmgroup.kernel.build_kernel`
reads to set up the tail kernel. Only the decisions are read from the log: the
instructions that run are the template's own. The first use of a replayed schedule is
checked against float64 (:mod:`tvmgroup.check`).
"""

from __future__ import annotations

import tvm
from tvm import s_tir

from tvmgroup.choice import ScheduleChoice
from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.logs import LogError, TuningLog, best_record
from tvmgroup.schedules import ReplayKnobs, trace_decisions
from tvmgroup.target import family_of


def choice_from_log(spec: OpSpec, target: tvm.target.Target, log: TuningLog, origin: str) -> ScheduleChoice:
    """The best schedule in ``log``; :class:`LogError` if it is unusable or does not replay."""
    best = best_record(log, spec)
    template = family_of(target).template()
    decisions = trace_decisions(best.record.trace)

    def apply(sch: s_tir.Schedule) -> None:
        knobs = ReplayKnobs(decisions)
        template(sch, spec.op, spec.layout, spec.bias, knobs)
        knobs.check_used_all()

    try:
        apply(s_tir.Schedule(ir_module(spec)))
    except Exception as err:
        raise LogError(f"{log.path}: its best trace does not replay onto symbolic rows ({err})") from None
    return ScheduleChoice(
        origin,
        apply,
        fingerprint=f"tuned-{tvm.__version__}-{best.digest}",
        log=str(log.path),
        tuned_rows=log.rows,
        note=f"{best.seconds * 1e6:.1f} us at {log.rows} rows",
    )
