"""One tuning run: MetaSchedule's evolutionary search and XGBoost cost model on one op.

Records go straight into the log's database files, one line per measurement, so an
interrupted run leaves a usable log; running the same request again measures only the
trials still missing from it (the search starts from the best records already there). The
first trial of a new log is the default schedule, so a log is never worse than no log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import tvm
from filelock import FileLock, Timeout
from tqdm import tqdm
from tvm.ir.utils import derived_object
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.schedules import DefaultTraceKnobs
from tvmgroup.target import family_of, target_key
from tvmgroup.logs import (
    FORMAT, RECORDS, WORKLOADS, Confirmation, LogError, TuningLog, best_record, confirmation,
    confirmed_or_searched_beats, count_records, default_seconds, log_dir, mean_secs, prune, read_meta,
    read_records, write_meta,
)
from tvmgroup.paths import home
from tvmgroup.tuning.confirm import confirm, needs_confirmation
from tvmgroup.tuning.search import SkipMeasured
from tvmgroup.tuning.space import make_space
from tvmgroup.tuning.workers import worker_initializer

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120.0  # generous: compile jobs share the cores with the measurements
RUN_TIMEOUT_S = 30.0
RPC_SESSION_TIMEOUT_S = 60  # one remote measurement: session, upload, run


class TuningDiskFull(RuntimeError):
    """The disk filled up while a log was written; what was recorded before stays usable."""


def tuning_rows(rows: int, target: tvm.target.Target) -> int:
    """``rows`` rounded up to the family's row multiple (the template needs exact tiles)."""
    if rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    multiple = family_of(target).row_multiple
    return -(-rows // multiple) * multiple


@dataclass(frozen=True)
class TuneRequest:
    spec: OpSpec
    target: tvm.target.Target
    rows: int  # already a multiple of the target family's row multiple
    trials: int
    root: Path
    space: str = "template"
    keep: int | None = None  # prune the log to this many best records at the end
    seed: int | None = None
    trials_per_iter: int = 16
    rpc: ms.runner.RPCConfig | None = None  # measure on the tracker's servers, else here

    @property
    def path(self) -> Path:
        return log_dir(self.root, target_key(self.target), self.spec, self.rows, self.space)


@dataclass
class TuneResult:
    path: Path
    trials_before: int
    trials_after: int
    best_seconds: float
    exhausted: bool = False  # the search space holds fewer distinct schedules than asked for
    default_seconds: float | None = None  # the default schedule, measured in the same run
    confirmed: Confirmation | None = None  # the best against the default, timed as the layer runs them

    @property
    def beats_default(self) -> bool:
        """Whether run-time lookup will use this log (its best beat the default: by the
        confirmation's timings where there is one, else by the search's)."""
        return confirmed_or_searched_beats(self.best_seconds, self.default_seconds, self.confirmed)


def _best_seconds(path: Path) -> float:
    if not (path / RECORDS).exists():
        return math.inf
    return min((mean_secs(r[1]) for _, r in read_records(path)), default=math.inf)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Feeds a tqdm bar (trials, best latency) and keeps the log's trial count current."""

    def __init__(self, bar: tqdm, path: Path, meta: dict, best: float) -> None:
        self.bar, self.path, self.meta, self.best = bar, path, meta, best
        self.error: OSError | None = None  # a failed write of the trial count (a full disk)

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        for result in runner_results:
            secs = mean_secs(result.run_secs) if result.run_secs is not None else math.inf
            self.best = min(self.best, secs)
        self.meta["trials"] = int(self.meta.get("trials", 0)) + len(runner_results)
        try:
            write_meta(self.path, self.meta)
        except OSError as err:  # stops the search; kept, as MetaSchedule may rewrap it
            self.error = err
            raise
        self.bar.update(len(runner_results))
        if math.isfinite(self.best):
            self.bar.set_postfix_str(f"best {self.best * 1e6:.1f} us")


def _check_device(target: tvm.target.Target) -> None:
    family = family_of(target)
    if family.device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "tuning for CUDA measures every candidate on a GPU, and no CUDA device is visible "
            "(torch.cuda.is_available() is False); run `tvmgroup tune --target cuda` on a machine with one"
        )


def _plain(value):
    """A target's exported attributes as plain JSON values."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def log_meta(req: TuneRequest, trials: int) -> dict:
    """The ``tvmgroup.json`` of a log: what lookup checks before trusting its records."""
    return {
        "format": FORMAT,
        "tvm_version": tvm.__version__,
        "target": _plain(dict(req.target.export())),
        "target_key": target_key(req.target),
        "spec_key": req.spec.key,
        "rows": req.rows,
        "space": req.space,
        "trials": trials,
    }


def _exit_on_interrupt(req: TuneRequest, path: Path, bar: tqdm) -> Callable[[], None]:
    """Makes Ctrl-C end the process at once; returns a function restoring the old handler.

    MetaSchedule's search loop runs in C++ and never lets a KeyboardInterrupt through, so
    Ctrl-C would otherwise be ignored until the run ends. Every measured record is already
    on disk, so exiting leaves the same loadable log a kill does.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame) -> None:
        bar.close()
        if req.keep is not None:
            prune(path, req.keep)
        done = max(int(read_meta(path).get("trials", 0) or 0), count_records(path))
        sys.stderr.write(
            f"\ntvmgroup tune: interrupted; {path} keeps {done} trials. Run the same command again to resume.\n"
        )
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


DEFAULT_SAMPLES = 3  # runner measurements of the default schedule; the fastest is recorded


def _measure_default(req: TuneRequest, database, builder, runner) -> float | None:
    """Measures the default schedule as MetaSchedule measures candidates and records it.

    The runner measures it ``DEFAULT_SAMPLES`` times and the fastest is recorded: the search
    keeps the fastest of many single samples of its candidates, and one sample of the default
    came out up to 1.9x slower than a repeat of it a minute later (docs/tuning.md), which made
    the search's best look that much better than the default.

    Returns its mean latency in seconds (None if it failed to build or run: the search then
    goes on without it).
    """
    mod = ir_module(req.spec, req.rows)
    sch = s_tir.Schedule(mod)
    family = family_of(req.target)
    family.template()(sch, req.spec.op, req.spec.layout, req.spec.bias, DefaultTraceKnobs())
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, req.target)])
    if built.error_msg:
        log.warning("the default schedule of %s failed to build: %s", req.spec.key, built.error_msg)
        return None
    try:
        runner_input = ms.runner.RunnerInput(built.artifact_path, family.device_type, args_info)
        results = [future.result() for future in runner.run([runner_input] * DEFAULT_SAMPLES)]
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    failed = [r for r in results if r.error_msg or not r.run_secs]
    if failed:
        log.warning("the default schedule of %s failed to run: %s", req.spec.key, failed[0].error_msg)
        return None
    result = min(results, key=lambda r: mean_secs(r.run_secs))
    workload = database.commit_workload(mod)
    database.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, workload, run_secs=result.run_secs, target=req.target, args_info=args_info)
    )
    return mean_secs(result.run_secs)


def _log_lock(path: Path) -> FileLock:
    """The lock one tuning run of a log holds: a second run of the same log waits for it
    (both would append to one record file and count trials over each other). It lives
    under ``$TVMGROUP_HOME/locks``, not in the log directory, which may be the repo's."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
    locks = home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{digest}.lock"))


@contextlib.contextmanager
def _exclusive(path: Path, spec_key: str):
    lock = _log_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        sys.stderr.write(f"tvmgroup tune: another run is tuning {spec_key} into {path}; waiting for it to finish\n")
        sys.stderr.flush()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _make_runner(req: TuneRequest):
    """MetaSchedule's runner: here (LocalRunner), or on the RPC servers registered under the
    request's key, as many at once as the tracker has."""
    if req.rpc is None:
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, initializer=worker_initializer())
    try:
        servers = req.rpc.count_num_servers(allow_missing=False)
    except ValueError as err:  # no tracker there, or no server under the key
        raise RuntimeError(str(err).strip()) from None
    return ms.runner.RPCRunner(req.rpc, max_workers=servers, initializer=worker_initializer())


def tune_op(req: TuneRequest, *, progress: bool = True, bar: tqdm | None = None) -> TuneResult:
    """Tunes ``req.spec`` until its log holds ``req.trials`` trials (resuming one if present).

    ``bar``: a progress bar shared by several runs (``tune_model``); else one of its own.
    A second run of the same log waits until the first is done. A full disk raises
    :class:`TuningDiskFull` (the log keeps what was recorded).
    """
    family = family_of(req.target)
    if req.rows % family.row_multiple:
        raise ValueError(f"tuning rows for {family.kind} must be a multiple of {family.row_multiple}, got {req.rows}")
    if req.trials < 1:
        raise ValueError(f"trials must be >= 1, got {req.trials}")
    if req.trials_per_iter < 1:
        raise ValueError(f"trials per iteration (--batch) must be >= 1, got {req.trials_per_iter}")
    if req.rpc is None:
        _check_device(req.target)
    path = req.path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with _exclusive(path, req.spec.key):
            result = _tune_locked(req, path, progress, bar)
            return _with_confirmation(req, result, progress)
    except OSError as err:
        if not _disk_full(err):
            raise
        done = max(int(read_meta(path).get("trials", 0) or 0), count_records(path))
        raise TuningDiskFull(
            f"no space left on the device while writing {path} ({err.strerror or err}); the log keeps "
            f"{done} trials. Free some space and run the same command again to resume"
        ) from None


def _tune_locked(req: TuneRequest, path: Path, progress: bool, shared_bar: tqdm | None) -> TuneResult:
    family = family_of(req.target)
    old = read_meta(path)
    if old and old.get("tvm_version") != tvm.__version__:
        raise RuntimeError(
            f"{path} was tuned with TVM {old.get('tvm_version')!r}, this is TVM {tvm.__version__}; "
            "delete it or pass another --output to start afresh"
        )
    done = before = max(int(old.get("trials", 0) or 0), count_records(path))
    remaining = req.trials - done
    if remaining <= 0 or (old.get("exhausted") and old.get("space") == req.space):
        return TuneResult(
            path, done, done, _best_seconds(path), exhausted=bool(old.get("exhausted")), default_seconds=default_seconds(old)
        )
    meta = log_meta(req, done)
    if default_seconds(old) is not None:  # a resumed log keeps its default's measurement
        meta["default_seconds"] = default_seconds(old)
    write_meta(path, meta)
    database = ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS), allow_missing=True)
    # CPU targets: the cores the kernel runs on (builds and search share them with the
    # measurements). GPU targets, and any target measured over RPC: build and search on every
    # core of this machine.
    cores = int(req.target.attrs.get("num-cores", 1) or 1) if family.multi_core else (os.cpu_count() or 1)
    if req.rpc is not None:
        cores = os.cpu_count() or 1
    builder = ms.builder.LocalBuilder(max_workers=cores, timeout_sec=BUILD_TIMEOUT_S, initializer=worker_initializer())
    runner = _make_runner(req)
    if shared_bar is None:
        bar = tqdm(total=req.trials, initial=done, desc=req.spec.key, unit="trial", disable=not progress, dynamic_ncols=True)
    else:
        bar = shared_bar
        bar.set_description_str(req.spec.key)
        bar.update(done)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    # Installed before the first measurement: Ctrl-C at any point leaves a loadable log.
    restore = _exit_on_interrupt(req, path, bar)
    try:
        if req.space == "template" and done == 0:
            # The default schedule is the search's first trial: the log's best is never slower
            # than the default (up to noise), and the search evolves from it.
            seconds = _measure_default(req, database, builder, runner)
            added = int(seconds is not None)
            done += added
            bar.update(added)
            meta["trials"] = done
            if seconds is not None:
                meta["default_seconds"] = seconds  # lookup uses the log only where it beat this
            write_meta(path, meta)
            remaining = req.trials - done
        if remaining > 0:
            _search(req, remaining, database, builder, runner, cores, bar=bar, meta=meta)
    finally:
        restore()
        if shared_bar is None:
            bar.close()
        if req.keep is not None:
            prune(path, req.keep)
    return _finish(req, path, before)


def _search(req: TuneRequest, remaining: int, database, builder, runner, cores: int, *, bar: tqdm, meta: dict) -> None:
    """MetaSchedule's evolutionary search for ``remaining`` more trials, into ``database``;
    schedules already in the log are not measured again (:class:`SkipMeasured`)."""
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    progress = _Progress(bar, req.path, meta, _best_seconds(req.path))
    callbacks.append(progress)
    with tempfile.TemporaryDirectory(prefix="tvmgroup-tune-") as work:
        try:
            ms.tune_tir(
                ir_module(req.spec, req.rows),
                req.target,
                work,
                max_trials_global=remaining,
                num_trials_per_iter=min(req.trials_per_iter, remaining),
                space=make_space(req.space, req.spec, req.target),
                strategy=SkipMeasured(),
                cost_model=ms.cost_model.XGBModel(num_tuning_cores=cores),
                database=database,
                builder=builder,
                runner=runner,
                measure_callbacks=callbacks,
                num_tuning_cores=cores,
                seed=req.seed,
            )
        except Exception:
            if progress.error is not None:  # MetaSchedule's loop may have rewrapped it
                raise progress.error from None
            raise


def _with_confirmation(req: TuneRequest, result: TuneResult, progress: bool) -> TuneResult:
    """``result`` with the log's best confirmed against the default as the layer runs them
    (:mod:`tvmgroup.tuning.confirm`), where it beat the default by the search's numbers and
    was measured here (not over RPC); a confirmation already recorded for the same best is
    reused."""
    if req.space != "template" or req.rpc is not None or family_of(req.target).device_type != "cpu":
        return result
    tuning_log = TuningLog(result.path, target_key(req.target), req.spec.key, req.rows, req.space,
                           read_meta(result.path))
    try:
        best = best_record(tuning_log, req.spec)
        if needs_confirmation(tuning_log, best, req.target):
            if progress:
                sys.stderr.write(f"{req.spec.key}: timing the best schedule against the default "
                                 "as the layer runs them\n")
                sys.stderr.flush()
            confirm(tuning_log, best, req.spec, req.target)
    except LogError as err:
        log.warning("%s: the log's best could not be confirmed against the default: %s", req.spec.key, err)
        return result
    return dataclasses.replace(result, confirmed=confirmation(tuning_log.meta, best.digest))


def _finish(req: TuneRequest, path: Path, before: int) -> TuneResult:
    meta = read_meta(path)
    after = int(meta.get("trials", before))
    if after < req.trials:
        # The search returned early: it found no candidate it had not measured already.
        meta["exhausted"] = True
        write_meta(path, meta)
    return TuneResult(
        path, before, after, _best_seconds(path), exhausted=after < req.trials, default_seconds=default_seconds(meta)
    )

