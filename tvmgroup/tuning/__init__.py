"""Auto-tuning with MetaSchedule: design spaces, tuning runs, logs and their replay.

* :mod:`.space`: the schedule templates as MetaSchedule design spaces (or the generic one).
* :mod:`.logs`: where logs live, what a valid log is, listing them.
* :mod:`.tune`: running MetaSchedule on one op, with progress and resume.
* :mod:`.replay`: a log's best trace as a :class:`~tvmgroup.kernel.ScheduleChoice`.
"""

from tvmgroup.tuning.logs import LogError, TuningLog, find_logs, log_dir
from tvmgroup.tuning.tune import TuneRequest, tune_op

__all__ = ["LogError", "TuningLog", "find_logs", "log_dir", "TuneRequest", "tune_op"]
