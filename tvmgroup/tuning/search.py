"""MetaSchedule's evolutionary search, never handing out a schedule the log already holds.

``EvolutionarySearch`` remembers what it measured only within one run: a resumed run (or the
search after the default schedule's trial) starts with an empty memory and measures
schedules already in the database again, spending the trials it was asked for on repeats.
:class:`SkipMeasured` wraps it as a MetaSchedule search strategy: it collects the
schedules of the database's records for the workload when tuning starts, and drops those
from every batch of candidates (asking the search again when a whole batch was known).
Schedules are compared as MetaSchedule compares them: by their scheduled IRModule.
"""

from __future__ import annotations

import logging

import tvm_ffi
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

log = logging.getLogger(__name__)

MAX_KNOWN_BATCHES = 8  # batches in a row made only of known schedules before giving up


def _key(mod) -> int:
    return tvm_ffi.structural_hash(mod)


@derived_object
class SkipMeasured(ms.search_strategy.PySearchStrategy):
    """``inner`` (default: ``EvolutionarySearch()``) without the schedules already measured."""

    def __init__(self, inner: ms.search_strategy.SearchStrategy | None = None) -> None:
        self.inner = inner if inner is not None else ms.search_strategy.EvolutionarySearch()
        self.known: set[int] = set()
        self.skipped = 0
        self._mod = None

    def _initialize_with_tune_context(self, context: ms.TuneContext) -> None:
        self.inner._initialize_with_tune_context(context)
        self._mod = context.mod

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)
        self.known = set()
        if database is None or self._mod is None or not database.has_workload(self._mod):
            return
        workload = database.commit_workload(self._mod)
        for record in database.get_all_tuning_records():
            if not tvm_ffi.structural_equal(record.workload.mod, workload.mod):
                continue
            try:
                sch = s_tir.Schedule(workload.mod)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception as err:  # a record of another template version: cannot repeat it
                log.debug("skipping a record that does not replay: %s", err)
                continue
            self.known.add(_key(sch.mod))

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        for _ in range(MAX_KNOWN_BATCHES):
            candidates = self.inner.generate_measure_candidates()
            if candidates is None:
                return None
            fresh = [c for c in candidates if _key(c.sch.mod) not in self.known]
            self.skipped += len(candidates) - len(fresh)
            if fresh:
                return fresh
        return None

    def notify_runner_results(self, measure_candidates, results) -> None:
        for candidate in measure_candidates:
            self.known.add(_key(candidate.sch.mod))
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self) -> "SkipMeasured":
        return SkipMeasured(self.inner.clone())
