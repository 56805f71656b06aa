"""scripts/gpu_check.sh and scripts/gpu_summary.py without a GPU: the script parses, its
summary writer reads every kind of step result (including cut-short and malformed files), and a
dry run on the CPU goes through every step and writes the summary, the tar and the logs."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses_and_keeps_going_past_failures():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "set -uo pipefail" in text and "set -e" not in text  # a failing step must not stop the run
    assert "PYTHONUNBUFFERED=1" in text and "timeout -k" in text


def _fake_results(out: Path) -> None:
    steps = [
        {"name": "install", "rc": 0, "seconds": 3.2, "limit_s": 90},
        {"name": "gpu_tests", "rc": 1, "seconds": 40.0, "limit_s": 150},
        {"name": "bench", "rc": 124, "seconds": 150.0, "limit_s": 150},
        {"name": "tune", "rc": -1, "seconds": 0, "limit_s": 0, "skipped": "dry run"},
    ]
    (out / "steps.jsonl").write_text("\n".join(json.dumps(s) for s in steps) + "\n{not json\n")
    (out / "gpu_tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>")
    (out / "smoke_tests.xml").write_text("<testsuites><testsuite")  # cut short by a time limit
    bench = {"options": {"dtype": "bfloat16", "device": "cuda"}, "machine": {"gpu_name": "NVIDIA H100"},
             "ceilings": {"sgemm_gflops": 700000.0, "copy_gbs": 3000.0},
             "shapes": [{"shape": {"n": 65536, "groups": 8, "in_features": 64, "out_features": 64},
                         "tvmgroup_speedup": None,
                         "results": [{"name": "bmm", "status": "ok", "message": "",
                                      "forward": {"median_ms": 0.25}, "forward_backward": {"median_ms": 0.8}},
                                     {"name": "grouped-mm", "status": "failed", "message": "RuntimeError: a|b",
                                      "forward": None, "forward_backward": None}]}]}
    (out / "bench" / "bfloat16").mkdir(parents=True)
    (out / "bench" / "bfloat16" / "bench.json").write_text(json.dumps(bench))
    (out / "bench" / "float16").mkdir()
    (out / "bench" / "float16" / "bench.json").write_text('{"shapes": [')  # cut short
    meta = json.dumps({"spec_key": "forward-g8", "target_key": "cuda-sm_90", "rows": 65536, "trials": 16}).encode()
    with tarfile.open(out / "tuning_logs.tar", "w") as tar:
        info = tarfile.TarInfo("tuning_logs/cuda-sm_90/forward-g8/tvmgroup.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))


def test_summary_of_fake_results(tmp_path, capsys):
    summary_module = _summary_module()
    _fake_results(tmp_path)
    assert summary_module.main([str(tmp_path)]) == 1  # not every step passed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok", "failed", "timed out", "skipped", "unreadable"]
    assert summary["ok"] is False
    gpu = summary["tests"]["gpu_tests"]
    assert (gpu["passed"], gpu["failures"], gpu["skipped"]) == (1, 1, 1)
    assert gpu["failed"] == ["tests.test_x::test_b: assert 1 == 2"]
    assert "unreadable" in summary["tests"]["smoke_tests"]["error"]
    bf16 = summary["bench"]["bench/bfloat16"]
    assert bf16["dtype"] == "bfloat16" and bf16["gpu"] == "NVIDIA H100"
    assert bf16["shapes"][0]["shape"] == "65536,8,64,64"
    assert [r["forward_ms"] for r in bf16["shapes"][0]["results"]] == [0.25, None]
    assert "unreadable" in summary["bench"]["bench/float16"]["error"]
    assert summary["tuning"]["files"] == 1
    (meta,) = summary["tuning"]["logs"].values()
    assert meta["target_key"] == "cuda-sm_90" and meta["trials"] == 16
    md = (tmp_path / "summary.md").read_text()
    assert "| bench | timed out | 124 |" in md and "RuntimeError: a/b" in md and "All steps ok: **no**" in md


def test_summary_of_an_empty_folder(tmp_path):
    summary_module = _summary_module()
    assert summary_module.main([str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == [] and summary["bench"] == {} and "missing" in summary["tuning"]["error"]
    assert summary_module.main([str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_dry_run_on_the_cpu(tmp_path):
    """Every step of the script on the CPU, with the smallest test subsets, into a fresh folder."""
    env = dict(os.environ, GPU_CHECK_TESTS="tests/test_bench_device.py", GPU_CHECK_SMOKE="tests/test_gpu_check.py",
               GPU_CHECK_WORK=str(tmp_path / "work"), PYTHONPATH="", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("PYTEST_ADDOPTS", None)
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert statuses == {"gpuwheels": "skipped", "install": "ok", "machine": "ok", "gpu_tests": "ok",
                        "smoke_tests": "ok", "bench_float32": "ok", "bench_bfloat16": "ok", "bench_float16": "ok",
                        "bench_autotune": "skipped", "tune": "skipped"}, statuses
    assert set(summary["bench"]) == {"bench/float32", "bench/bfloat16", "bench/float16"}
    for where, bench in summary["bench"].items():
        results = {r["name"]: r["status"] for r in bench["shapes"][0]["results"]}
        assert results["bmm"] == "ok", (where, results)
    assert (out / "tuning_logs.tar").exists() and (out / "summary.md").exists()
    assert {p.name for p in out.glob("*.log")} >= {"install.log", "bench_bfloat16.log", "summary.log"}


def test_out_of_time_steps_are_recorded_and_the_summary_still_written(tmp_path):
    """With the whole budget nearly spent, every step is cut short (exit 124) or not started,
    and the run still ends with its summary and tar."""
    env = dict(os.environ, GPU_CHECK_BUDGET_S="21", GPU_CHECK_WORK=str(tmp_path / "work"), PYTHONPATH="",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert statuses["bench_float16"] == "timed out" and statuses["tune"] == "skipped"
    assert all(s["seconds"] <= s["limit_s"] + 11 for s in summary["steps"])  # timeout -k 10
    assert summary["ok"] is False and (out / "tuning_logs.tar").exists()
    assert "no time left" in (out / "bench_float16.log").read_text()
