"""Tuning faults: a full disk, two runs of one log at once, a rerun after a kill, workers
left behind by a killed run."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tvmgroup import cli, logs
from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.logs import META, RECORDS, WORKLOADS, count_records, read_meta
from tvmgroup.schedules import SampledKnobs, template_for
from tvmgroup.target import cpu_target, target_key
from tvmgroup.tuning import tune as tune_mod
from tvmgroup.tuning.search import SkipMeasured
from tvmgroup.tuning.tune import TuneRequest, TuningDiskFull, tune_op

from tuning_helpers import fake_log

SPEC = OpSpec("forward", 2, 8, 8)
SHAPE = ["--groups", "2", "--in-features", "8", "--out-features", "8"]


def _runner_results(n: int) -> list:
    return [ms.runner.RunnerResult(run_secs=[1e-5 * (i + 1)], error_msg=None) for i in range(n)]


@pytest.fixture
def fake_measurements(monkeypatch):
    """No real measurement: the default counts one trial, the search reports its trials
    through the progress callback as MetaSchedule would."""
    calls = []

    def fake_default(req, database, builder, runner):
        return 1

    def fake_tune_tir(mod, target, work_dir, max_trials_global, measure_callbacks, **kwargs):
        calls.append(max_trials_global)
        progress = measure_callbacks[-1]._inst  # tvmgroup's callback, called as MetaSchedule would
        progress.apply(None, 0, [], [], _runner_results(max_trials_global))

    monkeypatch.setattr(tune_mod, "_measure_default", fake_default)
    monkeypatch.setattr(tune_mod.ms, "tune_tir", fake_tune_tir)
    return calls


def _enospc_on_meta(monkeypatch, after: int = 0):
    """Writes of tvmgroup.json fail with ENOSPC after ``after`` good ones, half-written."""
    real = Path.write_text
    seen = {"n": 0}

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(f".{META}.tmp"):
            seen["n"] += 1
            if seen["n"] > after:
                real(self, text[: len(text) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(logs.Path, "write_text", write_text)


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if ".tmp" in p.name)


def test_disk_full_at_the_start_is_a_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch, fake_measurements):
    _enospc_on_meta(monkeypatch)
    req = TuneRequest(SPEC, cpu_target(), 256, 4, tmp_path)
    with pytest.raises(TuningDiskFull, match="no space left on the device while writing .*the log keeps 0 trials. Free"):
        tune_op(req, progress=False)
    assert _leftovers(req.path) == []


def test_disk_full_during_the_search_keeps_the_log_and_says_so(tmp_path, monkeypatch, fake_measurements, capsys):
    _enospc_on_meta(monkeypatch, after=2)  # the start and the default's trial are written
    root = tmp_path / "logs"
    assert cli.main(["tune", *SHAPE, "--ops", "forward", "--rows", "256", "--trials", "5", "--quiet",
                     "--output", str(root)]) == 2
    err = capsys.readouterr().err
    assert "tvmgroup tune: error: no space left on the device" in err and "Traceback" not in err
    assert "the log keeps 1 trials" in err
    path = root / target_key(cpu_target()) / SPEC.key / "n256"
    assert _leftovers(path) == []
    assert read_meta(path)["trials"] == 1  # the last good count, not a torn file


def test_a_second_run_of_one_log_waits_and_no_trial_count_is_lost(tmp_path, fake_measurements, capsys):
    req = TuneRequest(SPEC, cpu_target(), 256, 4, tmp_path / "logs")
    req.path.mkdir(parents=True)
    lock = tune_mod._log_lock(req.path)
    lock.acquire()  # a first run holds the log
    results = {}
    second = threading.Thread(target=lambda: results.update(r=tune_op(
        TuneRequest(SPEC, cpu_target(), 256, 6, tmp_path / "logs"), progress=False)))
    second.start()
    time.sleep(1.0)
    assert second.is_alive() and fake_measurements == []  # waiting, nothing measured
    first = threading.Thread(target=lambda: results.update(q=tune_op(req, progress=False)))
    lock.release()
    second.join(30)
    first.start()
    first.join(30)
    assert not second.is_alive() and not first.is_alive()
    assert "another run is tuning" in capsys.readouterr().err
    assert results["r"].trials_after == 6  # the default and 5 searched
    assert results["q"].trials_after == 6 and results["q"].trials_before == 6  # saw the other's count
    assert read_meta(req.path)["trials"] == 6


def _schedules(path: Path, spec: OpSpec, rows: int = 256) -> list[int]:
    db = ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS))
    out = []
    for record in db.get_all_tuning_records():
        sch = s_tir.Schedule(ir_module(spec, rows))
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        out.append(tvm_ffi.structural_hash(sch.mod))
    return out


class _Inner:
    """A search strategy handing out fixed batches of candidates."""

    def __init__(self, batches):
        self.batches, self.notified = list(batches), []

    def _initialize_with_tune_context(self, context):
        pass

    def pre_tuning(self, *args):
        pass

    def generate_measure_candidates(self):
        return self.batches.pop(0) if self.batches else None

    def notify_runner_results(self, candidates, results):
        self.notified.append(len(candidates))


def _candidate(seed: int):
    mod = ir_module(SPEC, 256)
    sch = s_tir.Schedule(mod, seed=seed)
    template_for("llvm")(sch, SPEC.op, SPEC.layout, SPEC.bias, SampledKnobs())
    return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_prim_func(mod["main"]))


def test_schedules_already_in_the_log_are_not_handed_out_again(tmp_path):
    path = fake_log(tmp_path, SPEC, cpu_target(), seeds=(1, 2))
    known = set(_schedules(path, SPEC))
    fresh_seed = next(s for s in range(3, 200)
                      if tvm_ffi.structural_hash(_candidate(s).sch.mod) not in known)
    database = ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS))
    inner = _Inner([[_candidate(1), _candidate(2)], [_candidate(2), _candidate(fresh_seed), _candidate(1)]])
    strategy = SkipMeasured(inner)._inst  # its Python methods, called as MetaSchedule would

    class Context:
        mod = ir_module(SPEC, 256)

    strategy._initialize_with_tune_context(Context())
    strategy.pre_tuning(4, 2, [], database, None)
    batch = strategy.generate_measure_candidates()  # the first batch was all known: asks again
    assert [tvm_ffi.structural_hash(c.sch.mod) for c in batch] == [tvm_ffi.structural_hash(_candidate(fresh_seed).sch.mod)]
    assert strategy.skipped == 4
    strategy.notify_runner_results(batch, _runner_results(1))
    assert inner.notified == [1]
    assert strategy.generate_measure_candidates() is None


@pytest.mark.slow
def test_a_killed_run_leaves_no_worker_and_its_rerun_repeats_no_schedule(tmp_path):
    """SIGKILL once the first trials are recorded: MetaSchedule's workers end with it; the
    same command completes the log without measuring a schedule twice."""
    home = tmp_path / "home"
    env = dict(os.environ, TVMGROUP_HOME=str(home))
    args = ["tune", *SHAPE, "--ops", "forward", "--rows", "256", "--trials", "6", "--batch", "2", "--seed", "3", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "tvmgroup.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    path = home / "tuning_logs" / target_key(cpu_target()) / SPEC.key / "n256"
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)]
            if count_records(path) >= 1 and workers:
                break
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be killed")
        assert workers, "no MetaSchedule worker started in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived the killed run: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        for child in workers:
            if child.is_running():
                child.kill()
    recorded = count_records(path)
    again = subprocess.run([sys.executable, "-m", "tvmgroup.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    schedules = _schedules(path, SPEC)
    assert len(schedules) == len(set(schedules)), "a schedule in the log was measured again"
    assert len(schedules) >= recorded
