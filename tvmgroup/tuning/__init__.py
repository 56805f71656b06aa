"""Auto-tuning with MetaSchedule: design spaces and tuning runs.

* :mod:`.space`: the schedule templates as MetaSchedule design spaces (or the generic one).
* :mod:`.tune`: running MetaSchedule on one op, with progress and resume.

The logs a run writes are read by the run-time (:mod:`tvmgroup.logs`, :mod:`tvmgroup.replay`,
:mod:`tvmgroup.lookup`); the tuner imports the run-time, never the reverse, so ``import
tvmgroup`` and a call of the op load nothing from this package.
"""
