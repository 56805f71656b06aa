"""A real (tiny) tuning run through the CLI, used by a new process; resume; kill; ``logs``.

Tuning measures on the machine's cores, so the runs here are a few trials of G=2, K=O=8.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tvmgroup import cli
from tvmgroup.compute import OpSpec
from tvmgroup.target import cpu_target, target_key
from tvmgroup.logs import (
    CONFIRMED, META, RECORDS, best_beats, best_record, confirmation, count_records, default_seconds, find_logs,
    mean_secs, prune, read_records,
)
from tvmgroup.tuning import tune as tune_mod
from tvmgroup.tuning.tune import TuneRequest, tune_op

from tuning_helpers import fake_log

pytestmark = pytest.mark.slow

SHAPE = ["--groups", "2", "--in-features", "8", "--out-features", "8"]
SPEC = OpSpec("forward", 2, 8, 8)


def tvmgroup_cli(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, TVMGROUP_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "tvmgroup.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tuned_home(tmp_path_factory) -> Path:
    """A TVMGROUP_HOME holding a real 4-trial forward log (tuned at --rows 200 -> 256)."""
    home = tmp_path_factory.mktemp("tuned_home")
    done = tvmgroup_cli(home, "tune", *SHAPE, "--rows", "200", "--ops", "forward", "--trials", "4", "--seed", "0", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "rounded up to 256" in done.stderr
    assert "forward-last-g2-k8-o8-float32-bias: 4 trials (4 new)" in done.stdout
    return home


CHECK = r"""
import json, sys, torch, tvmgroup
from tvmgroup.lookup import kernel_for
from tvmgroup.compute import OpSpec
from tvmgroup.target import cpu_target
info = tvmgroup.schedule_info("forward", 2, 8, 8)
errors = {}
for n in (1, 7, 1000):
    x, w, b = torch.randn(n, 16), torch.randn(2, 8, 8), torch.randn(2, 8)
    y = tvmgroup.grouped_linear(x, w, b).double().view(n, 2, 8)
    xs = x.double().view(n, 2, 8)
    ref = torch.einsum("ngk,gok->ngo", xs, w.double()) + b.double()
    mag = torch.einsum("ngk,gok->ngo", xs.abs(), w.double().abs()) + b.double().abs()
    errors[n] = ((y - ref).abs() / mag).max().item()
kernel = kernel_for(OpSpec("forward", 2, 8, 8), cpu_target())
print(json.dumps({"info": info, "errors": errors, "kernel_origin": kernel.choice.origin, "row_tile": kernel.row_tile}))
"""


def _home_with_default(tuned_home: Path, tmp_path: Path, default_seconds) -> Path:
    """A copy of the tuned home whose log says the default ran ``default_seconds``
    (a callable of the log's best), by the search's numbers alone (no confirmation)."""
    home = tmp_path / "home"
    shutil.copytree(tuned_home, home)
    (log,) = find_logs(home / "tuning_logs", spec_key=SPEC.key)
    meta = json.loads((log.path / META).read_text())
    best = min(mean_secs(r[1]) for _, r in read_records(log.path))
    meta["default_seconds"] = default_seconds(best)
    meta.pop(CONFIRMED, None)
    (log.path / META).write_text(json.dumps(meta))
    return home


def _check_in_new_process(home: Path) -> tuple[dict, str]:
    env = dict(os.environ, TVMGROUP_HOME=str(home))
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(err < 1e-5 for err in out["errors"].values()), out["errors"]
    assert "UntunedShapeWarning" not in done.stderr and "skipping" not in done.stderr
    return out, done.stderr


def test_new_process_uses_the_log_at_any_n(tuned_home, tmp_path):
    home = _home_with_default(tuned_home, tmp_path, lambda best: 2 * best)  # the log beat its default
    out, _ = _check_in_new_process(home)
    info = out["info"]
    assert info["origin"] == "user" and info["tuned_rows"] == 256
    assert info["target_key"] == target_key(cpu_target())
    assert Path(info["log"]) == home / "tuning_logs" / info["target_key"] / SPEC.key / "n256"
    assert out["kernel_origin"] == "user"


def test_a_log_that_did_not_beat_its_default_leaves_the_default(tuned_home, tmp_path):
    home = _home_with_default(tuned_home, tmp_path, lambda best: best * 1.01)  # within 2%
    out, _ = _check_in_new_process(home)
    info = out["info"]
    assert info["origin"] == "default" and out["kernel_origin"] == "default"
    assert Path(info["log"]).parent.parent.parent == home / "tuning_logs"
    assert "within 2% of the best of 4 trials" in info["note"]


def test_a_best_that_beat_the_default_in_the_search_is_confirmed_as_the_layer_runs_it(tuned_home):
    (log,) = find_logs(tuned_home / "tuning_logs", spec_key=SPEC.key)
    best = best_record(log, SPEC)
    confirmed = confirmation(log.meta, best.digest)
    if best_beats(best.seconds, default_seconds(log.meta)):
        assert confirmed is not None and confirmed.best_seconds > 0 and confirmed.default_seconds > 0
    else:  # the default itself was best (or within 2%): lookup serves the default, nothing to confirm
        assert CONFIRMED not in log.meta


def test_the_log_records_the_default_and_the_command_prints_both(tuned_home, tmp_path):
    (log,) = find_logs(tuned_home / "tuning_logs", spec_key=SPEC.key)
    default = json.loads((log.path / META).read_text())["default_seconds"]
    latencies = [mean_secs(r[1]) for _, r in read_records(log.path)]
    assert default in latencies and min(latencies) <= default  # the default is one of the records
    home = tmp_path / "again"
    shutil.copytree(tuned_home, home)
    done = tvmgroup_cli(home, "tune", *SHAPE, "--rows", "256", "--ops", "forward", "--trials", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"against the default's {default * 1e6:.1f} us" in done.stdout
    assert "lookup uses the log" in done.stdout or "lookup keeps the default" in done.stdout


def test_same_command_again_runs_nothing(tuned_home):
    path = tuned_home / "tuning_logs" / target_key(cpu_target()) / SPEC.key / "n256"
    before = (path / RECORDS).read_text()
    start = time.perf_counter()
    done = tvmgroup_cli(tuned_home, "tune", *SHAPE, "--rows", "256", "--ops", "forward", "--trials", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "4 trials (already done)" in done.stdout
    assert (path / RECORDS).read_text() == before
    assert time.perf_counter() - start < 60


def test_first_trial_is_the_default_schedule(tuned_home):
    """The default is measured into every new log, so the log's best is never slower."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from tvmgroup.compute import ir_module
    from tvmgroup.schedules import DefaultTraceKnobs, template_for, trace_decisions
    from tvmgroup.logs import RECORDS, WORKLOADS, find_logs

    sch = s_tir.Schedule(ir_module(SPEC, 256))
    template_for("llvm")(sch, SPEC.op, SPEC.layout, SPEC.bias, DefaultTraceKnobs())
    (log,) = find_logs(tuned_home / "tuning_logs", spec_key=SPEC.key)
    db = ms.database.JSONDatabase(str(log.path / WORKLOADS), str(log.path / RECORDS))
    logged = [trace_decisions(r.trace) for r in db.get_all_tuning_records()]
    assert len(logged) == 4
    assert trace_decisions(sch.trace) in logged


def test_resume_runs_only_the_missing_trials(tuned_home, tmp_path, monkeypatch):
    seen = {}

    def fake_tune_tir(mod, target, work_dir, max_trials_global, **kwargs):
        seen["trials"] = max_trials_global

    monkeypatch.setattr(tune_mod.ms, "tune_tir", fake_tune_tir)
    req = TuneRequest(SPEC, cpu_target(), 256, 10, tuned_home / "tuning_logs", seed=0)
    result = tune_op(req, progress=False)
    assert seen["trials"] == 6 and result.trials_before == 4


def test_logs_command_lists_the_log(tuned_home, monkeypatch, capsys):
    monkeypatch.setenv("TVMGROUP_HOME", str(tuned_home))
    assert cli.main(["logs"]) == 0
    out = capsys.readouterr().out
    assert SPEC.key in out and "user" in out and "n256" in out and target_key(cpu_target()) in out
    assert cli.main(["logs", "--all"]) == 0
    assert SPEC.key in capsys.readouterr().out


def test_logs_command_when_empty(tmp_path, monkeypatch, capsys):
    from tvmgroup import paths

    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path))
    monkeypatch.setattr(paths, "shipped_logs_dir", lambda: tmp_path / "shipped")
    assert cli.main(["logs"]) == 0
    assert "no tuning logs" in capsys.readouterr().out


def test_logs_command_lists_the_shipped_logs(tmp_path, monkeypatch, capsys):
    """With no logs of the user's, the package's own are listed as shipped."""
    from tvmgroup.paths import shipped_logs_dir

    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path))
    assert cli.main(["logs", "--all"]) == 0
    out = capsys.readouterr().out
    shipped = [line for line in out.splitlines() if line.startswith("shipped")]
    assert len(shipped) == len(list(shipped_logs_dir().glob("*/*/n*/tvmgroup.json"))) > 0
    assert all("user" not in line.split()[0] for line in shipped)


def test_interrupted_run_leaves_a_loadable_log_and_resumes(tmp_path):
    """Ctrl-C (SIGINT to the group) once the first batch is recorded: the run exits at once,
    the log serves, and the same command completes it."""
    home = tmp_path / "home"
    env = dict(os.environ, TVMGROUP_HOME=str(home))
    args = ["tune", *SHAPE, "--ops", "grad_input", "--rows", "256", "--trials", "4", "--batch", "2", "--seed", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "tvmgroup.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    spec = OpSpec("grad_input", 2, 8, 8)
    path = home / "tuning_logs" / target_key(cpu_target()) / spec.key / "n256"
    deadline = time.monotonic() + 240
    while proc.poll() is None and count_records(path) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    recorded = count_records(path)
    if proc.returncode != 0:  # interrupted, not finished before the signal
        assert proc.returncode == 130 and "interrupted" in err and "Run the same command again" in err, err
    assert recorded >= 1
    env_check = dict(env, PYTHONWARNINGS="error::UserWarning")  # a skipped log would warn
    check = subprocess.run(
        [sys.executable, "-c", "import json, tvmgroup; print(json.dumps(tvmgroup.schedule_info('grad_input', 2, 8, 8)))"],
        env=env_check, capture_output=True, text=True, timeout=120,
    )
    assert check.returncode == 0, check.stderr
    info = json.loads(check.stdout.strip().splitlines()[-1])
    # The log loads: lookup uses it, or keeps the default where the log says so (a log whose
    # only records are the default and slower schedules).
    assert Path(info["log"]) == path, info
    assert info["origin"] == "user" or "within 2%" in info["note"], info
    again = tvmgroup_cli(home, *args)
    assert again.returncode == 0, again.stderr
    status = "already done" if recorded >= 4 else f"{4 - recorded} new"
    assert f"4 trials ({status})" in again.stdout
    (log,) = find_logs(home / "tuning_logs")
    assert log.trials == 4 == count_records(path)


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cli.main(["tune", *SHAPE, "--target", "cuda:sm_90", "--trials", "4"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_bad_arguments_name_what_was_expected(capsys):
    assert cli.main(["tune", *SHAPE, "--ops", "forward,grad_bias"]) == 2
    assert "--ops must be a comma-separated subset of forward,grad_input,grad_weight,backward" in capsys.readouterr().err
    assert cli.main(["tune", *SHAPE, "--ops", "backward", "--target", "cuda:sm_90"]) == 2
    assert "--ops backward: the cuda template does not schedule it on layout 'last'" in capsys.readouterr().err
    for option, value in (("--trials", "0"), ("--keep", "0"), ("--rows", "-4")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["tune", *SHAPE, option, value])
        assert exit_info.value.code == 2
        assert f"{option}: expected an integer >= 1, got {int(value)}" in capsys.readouterr().err


def test_dtypes_are_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "logs"
    with pytest.raises(SystemExit):
        cli.main(["tune", *SHAPE, "--dtype", "../../x", "--output", str(out)])
    assert "invalid choice: '../../x'" in capsys.readouterr().err
    assert cli.main(["tune", *SHAPE, "--dtype", "float16", "--target", "llvm", "--output", str(out)]) == 2
    assert "llvm kernels run float32; nothing would use this log" in capsys.readouterr().err
    assert not out.exists()


def test_prune_keeps_the_best_records(tmp_path):
    path = fake_log(tmp_path, SPEC, cpu_target(), seeds=(1, 2, 3, 4))
    assert prune(path, 2) == 2
    secs = [json.loads(line)[1][1] for line in (path / RECORDS).read_text().splitlines()]
    assert sorted(s[0] for s in secs) == pytest.approx([1e-5, 2e-5])
    (log,) = find_logs(tmp_path)
    assert log.trials == 4  # the trial count survives pruning, so a rerun does not redo them


def test_tune_the_fused_backward(tmp_path):
    """A tiny real run of the fused backward; the log then serves it, checked against float64."""
    home = tmp_path / "home"
    done = tvmgroup_cli(home, "tune", *SHAPE, "--ops", "backward", "--rows", "256", "--trials", "3", "--seed", "0", "--quiet")
    assert done.returncode == 0, done.stderr
    spec = OpSpec("backward", 2, 8, 8)
    assert f"{spec.key}: 3 trials (3 new)" in done.stdout
    env = dict(os.environ, TVMGROUP_HOME=str(home), PYTHONWARNINGS="error::UserWarning")
    check = subprocess.run(
        [sys.executable, "-c", "import tvmgroup; from tvmgroup import lookup, check; from tvmgroup.compute import OpSpec; "
         "from tvmgroup.target import cpu_target; k = lookup.kernel_for(OpSpec('backward', 2, 8, 8), cpu_target()); "
         "check.check_kernel(k, seed=4); import json; "
         "print(json.dumps({'origin': k.choice.origin, 'log': k.choice.log, 'note': k.choice.note}))"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert check.returncode == 0, check.stderr
    got = json.loads(check.stdout.strip().splitlines()[-1])
    # The log serves: lookup uses it, or keeps the default its best did not beat.
    assert got["log"] and (got["origin"] == "user" or "within 2%" in got["note"]), got


def test_default_ops_are_those_the_template_schedules():
    from tvmgroup.commands.tune import _ops
    from tvmgroup.target import FAMILIES

    assert _ops(None, FAMILIES["llvm"], "conv") == ["forward", "grad_input", "grad_weight", "backward"]
    assert _ops(None, FAMILIES["cuda"], "last") == ["forward", "grad_input", "grad_weight"]


def test_the_default_is_recorded_at_the_fastest_of_its_samples(tmp_path, caplog):
    from tvm.s_tir import meta_schedule as ms

    from tvmgroup.tuning.workers import worker_initializer

    samples = [3e-3, 1e-3, 2e-3]
    assert tune_mod.DEFAULT_SAMPLES == len(samples)

    class Done:
        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def result(self):
            return ms.runner.RunnerResult(run_secs=[self.seconds], error_msg=None)

    class SampledRunner:
        def run(self, inputs):
            assert len(inputs) == len(samples) and len({id(i) for i in inputs}) == 1  # one schedule, measured thrice
            return [Done(s) for s in samples]

    req = TuneRequest(SPEC, cpu_target(), 256, 1, tmp_path / "tuning_logs")
    database = ms.database.MemoryDatabase()
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=tune_mod.BUILD_TIMEOUT_S, initializer=worker_initializer())
    assert tune_mod._measure_default(req, database, builder, SampledRunner()) == pytest.approx(1e-3), caplog.text
    (record,) = database.get_all_tuning_records()
    assert [float(s) for s in record.run_secs] == pytest.approx([1e-3])
