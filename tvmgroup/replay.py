"""A log's best trace as a schedule for the symbolic-row op.

Tuning runs the template at a fixed row count; the best trace's sampling decisions are fed
back to the same template (:class:`~tvmgroup.schedules.ReplayKnobs`) on the compute with a
symbolic row count. The template samples G/K/O tiles on static loops and row tiles
categorically, so the same decisions are valid there: one tuned log serves every N.
The row tile travels as a block annotation, which :func:`~tvmgroup.kernel.build_kernel`
reads to set up the tail kernel. Only the decisions are read from the log: the
instructions that run are the template's own. The first use of a replayed schedule is
checked against float64 (:mod:`tvmgroup.check`).

A log is data someone else may have written (see ``docs/security.md``). Before TVM parses
any of it (parsing a record applies its trace to a schedule), every record's trace must pass
:func:`~tvmgroup.schedules.knobs.check_trace`: only the instruction kinds, annotation keys
and decision shapes the templates emit. The best record's decisions, as the log writes them
(not as TVM's parser may have rewritten them), must then fit the template's choices exactly.
"""

from __future__ import annotations

import hashlib
import json

import tvm
from tvm import s_tir

from tvmgroup.choice import ScheduleChoice
from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.logs import LogError, TuningLog, beats_default, best_record, read_records
from tvmgroup.schedules import ReplayKnobs, trace_decisions
from tvmgroup.schedules.knobs import TraceRefused, check_trace, trace_samples, trace_structure
from tvmgroup.target import family_of


def _digest(trace_json) -> str:
    """The digest :func:`~tvmgroup.logs.best_record` gives a record's trace JSON."""
    return hashlib.sha256(json.dumps(trace_json, sort_keys=True).encode()).hexdigest()[:16]


def checked_traces(log: TuningLog, target_kind: str) -> dict[str, list]:
    """Every record's trace JSON in ``log`` by digest; :class:`LogError` if any one holds
    something no template emits (the whole log is refused: someone made it by hand)."""
    try:
        records = read_records(log.path)
    except OSError as err:
        raise LogError(f"{log.path}: unreadable ({err})") from None
    traces = {}
    for number, (_, record) in enumerate(records, 1):
        try:
            check_trace(record[0], target_kind)
        except TraceRefused as err:
            raise LogError(
                f"{log.path}: refused: record {number} does not replay a tvmgroup {target_kind} template: {err}"
            ) from None
        traces[_digest(record[0])] = record[0]
    return traces


def choice_from_log(
    spec: OpSpec, target: tvm.target.Target, log: TuningLog, origin: str, *, only_if_faster: bool = True
) -> ScheduleChoice | None:
    """The best schedule in ``log``; None where it did not beat the default schedule
    (:func:`~tvmgroup.logs.beats_default`), unless ``only_if_faster`` is False;
    :class:`LogError` if it is unusable or does not replay."""
    kind = target.kind.name
    traces = checked_traces(log, kind)
    best = best_record(log, spec)
    if only_if_faster and not beats_default(log, best):
        return None
    raw = traces.get(best.digest)
    if raw is None:  # the file changed between the check and the parse (a tuning run appending)
        raise LogError(f"{log.path}: changed while it was read; its best record was not checked")
    template = family_of(target).template()
    # The log's own decisions: TVM's parser silently rewrites a tile decision that does not
    # divide its loop, and ReplayKnobs refuses such a decision instead.
    decisions, samples = trace_decisions(raw, kind), trace_samples(raw, kind)
    structure = trace_structure(raw, kind)

    def apply(sch: s_tir.Schedule) -> None:
        knobs = ReplayKnobs(decisions, samples, structure)
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
