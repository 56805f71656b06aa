"""Run-time lookup of tuning logs: order, replay at any N, the float64 check, and fallbacks.

Logs here are made by hand (sampled template traces, made-up latencies), so no test
measures anything; ``test_tuning_run.py`` does a real tuning run.
"""

from __future__ import annotations

import json
import warnings

import pytest

from tvmgroup import lookup
from tvmgroup.compute import OPS, OpSpec
from tvmgroup.lookup import TuningLogWarning, UntunedShapeWarning
from tvmgroup.paths import user_logs_dir
from tvmgroup.target import cpu_target, cpu_vector_bits, cuda_target, target_key
from tvmgroup import check
from tvmgroup.logs import META, RECORDS, LogError, find_logs

from tuning_helpers import fake_log, forward_error, fresh_lookup, schedule_info_of

SPEC = OpSpec("forward", 2, 8, 8)


fresh = pytest.fixture(autouse=True)(fresh_lookup)


def info(spec: OpSpec = SPEC) -> dict:
    return schedule_info_of(spec)


def test_untuned_warns_once_with_the_command():
    with pytest.warns(UntunedShapeWarning, match="tvmgroup tune --ops forward --groups 2 --in-features 8"):
        assert info()["origin"] == "default"
    lookup.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert info()["origin"] == "default"  # a second time: no warning


def test_quiet_env_silences(monkeypatch):
    monkeypatch.setenv("TVMGROUP_QUIET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert info()["origin"] == "default"


def test_user_log_serves_every_n():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    got = info()
    assert got["origin"] == "user" and got["log"] == str(path) and got["tuned_rows"] == 256
    assert got["target_key"] == target_key(cpu_target())
    for n in (1, 7, 1000):
        assert forward_error(n) < 1e-5


@pytest.mark.parametrize("features", [(8, 24), (128, 144)], ids=["small", "panels"])
@pytest.mark.parametrize("layout", ["last", "conv"])
@pytest.mark.parametrize("op", OPS)
def test_every_op_replays_and_passes_the_check(op, layout, features):
    spec = OpSpec(op, 2, *features, layout=layout)
    fake_log(user_logs_dir(), spec, cpu_target(), seeds=(5,))
    kernel = lookup.kernel_for(spec, cpu_target())
    assert kernel.choice.origin == "user"
    check.check_kernel(kernel, seed=3)


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("layout", ["ensemble", "last"])
@pytest.mark.parametrize("op", OPS)
def test_new_layouts_and_weight_conventions_replay_and_pass_the_check(op, layout, weight_layout):
    """Tuning measures compact buffers; the trace replays onto the strided run-time buffers
    of "ensemble", and onto (G, K, O) weights."""
    if layout == "last" and weight_layout == "out_in":
        pytest.skip("covered above")
    spec = OpSpec(op, 2, 8, 24, layout=layout, weight_layout=weight_layout)
    fake_log(user_logs_dir(), spec, cpu_target(), seeds=(5,))
    kernel = lookup.kernel_for(spec, cpu_target())
    assert kernel.choice.origin == "user"
    check.check_kernel(kernel, seed=3)


def test_shipped_log_after_user(monkeypatch, tmp_path):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(lookup, "shipped_logs_dir", lambda: shipped)
    fake_log(shipped, SPEC, cpu_target())
    assert info()["origin"] == "shipped"
    lookup.forget()
    fake_log(user_logs_dir(), SPEC, cpu_target())
    assert info()["origin"] == "user"


# x86 CPUs LLVM knows, by the width of their widest float vector.
CPUS_BY_WIDTH = {512: ("znver4", "skylake-avx512", "icelake-server"), 256: ("haswell", "znver3", "znver2"),
                 128: ("x86-64", "nehalem", "westmere")}


def _other_cpu(same_width: bool) -> str:
    own = cpu_target().attrs["mcpu"]
    width = cpu_vector_bits(own)
    names = [name for bits, cpus in CPUS_BY_WIDTH.items() if (bits == width) == same_width for name in cpus]
    return next(name for name in names if name != own)


def test_other_cpu_of_the_same_vector_width_is_used_with_a_note():
    fake_log(user_logs_dir(), SPEC, cpu_target(), key=f"llvm-{_other_cpu(same_width=True)}")
    with pytest.warns(TuningLogWarning, match="another CPU"):
        assert info()["origin"] == "user"
    assert forward_error(9) < 1e-5


@pytest.mark.parametrize("name", ["other-width", "unknown", "not-a-name"])
def test_other_cpu_of_another_vector_width_or_unknown_is_not_used(name):
    mcpu = {"other-width": _other_cpu(same_width=False), "unknown": "someothercpu", "not-a-name": "bad name!"}[name]
    fake_log(user_logs_dir(), SPEC, cpu_target(), key=f"llvm-{mcpu}")
    with pytest.warns(UntunedShapeWarning):
        assert info()["origin"] == "default"


def test_vector_widths_of_known_cpus():
    for bits, cpus in CPUS_BY_WIDTH.items():
        for name in cpus:
            assert cpu_vector_bits(name) == bits, name
    assert cpu_vector_bits("someothercpu") is None and cpu_vector_bits("-mattr=+avx") is None


def _with_default(path, value) -> None:
    meta = json.loads((path / META).read_text())
    meta["default_seconds"] = value
    (path / META).write_text(json.dumps(meta))


def test_a_log_serves_only_where_it_beat_its_default():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())  # best record: 1e-5 s
    _with_default(path, 1.5e-5)
    assert info()["origin"] == "user"
    lookup.forget()
    _with_default(path, 1.01e-5)  # under 2% slower than the best: the default serves
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tuned shape: no untuned warning
        got = info()
    assert got["origin"] == "default" and got["log"] == str(path) and "within 2%" in got["note"]
    assert forward_error(9) < 1e-5


@pytest.mark.parametrize("value", ["fast", -1.0, float("nan"), True, None, [1]])
def test_a_default_latency_that_is_not_a_positive_number_is_ignored(value):
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    _with_default(path, value)
    assert info()["origin"] == "user"


def test_cuda_log_is_not_used_for_the_cpu():
    fake_log(user_logs_dir(), SPEC, cpu_target(), key="cuda-sm_90")
    with pytest.warns(UntunedShapeWarning):
        assert info()["origin"] == "default"


def _expect_fallback(match: str) -> None:
    with pytest.warns(TuningLogWarning, match=match):
        assert info()["origin"] == "default"
    for n in (1, 7, 300):
        assert forward_error(n) < 1e-5


def test_corrupt_records_fall_back():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    (path / RECORDS).write_text("[0, [[[[\"GetSBlock\", garbage\n")
    _expect_fallback("no successfully measured record")


def test_garbage_trace_falls_back():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    lines = (path / RECORDS).read_text().splitlines()
    index, record = json.loads(lines[0])
    record[0] = [[["NoSuchInstruction", [], [], []]], []]
    (path / RECORDS).write_text(json.dumps([index, record]) + "\n")
    _expect_fallback("cannot parse|does not replay")


def test_truncated_last_line_is_skipped():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    text = (path / RECORDS).read_text()
    (path / RECORDS).write_text(text[: len(text) - 40])  # a torn last record
    assert info()["origin"] == "user"
    assert forward_error(7) < 1e-5


def test_empty_log_falls_back():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    (path / RECORDS).write_text("")
    _expect_fallback("no successfully measured record")


def test_other_tvm_version_falls_back():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    meta = json.loads((path / META).read_text())
    meta["tvm_version"] = "0.1.0"
    (path / META).write_text(json.dumps(meta))
    _expect_fallback("made with TVM '0.1.0'")


def test_wrong_workload_falls_back():
    other = OpSpec("forward", 2, 8, 16)
    src = fake_log(user_logs_dir(), other, cpu_target())
    dst = user_logs_dir() / target_key(cpu_target()) / SPEC.key / "n256"
    dst.parent.mkdir(parents=True)
    src.rename(dst)
    meta = json.loads((dst / META).read_text())
    meta["spec_key"] = SPEC.key
    (dst / META).write_text(json.dumps(meta))
    _expect_fallback("workload is not")


def test_missing_meta_falls_back():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    (path / META).unlink()
    _expect_fallback("missing or unreadable")


def test_failing_check_falls_back(monkeypatch):
    fake_log(user_logs_dir(), SPEC, cpu_target())

    def wrong(kernel, seed=0):
        raise LogError("wrong results (simulated)")

    monkeypatch.setattr(lookup, "check_kernel", wrong)
    with pytest.warns(TuningLogWarning, match="simulated"):
        kernel = lookup.kernel_for(SPEC, cpu_target())
    assert kernel.choice.origin == "default"
    assert forward_error(5) < 1e-5


def test_tensor_core_default_that_fails_its_check_falls_back_to_simt(monkeypatch):
    """On a GPU, the default float16/bfloat16 kernel is checked once; a failure serves SIMT."""
    spec = OpSpec("forward", 2, 8, 8, dtype="float16")
    target = cuda_target("sm_90")
    built = []
    monkeypatch.setattr(lookup.KERNELS, "get", lambda spec, target, choice, serial=False: built.append(choice) or choice)
    seen = []

    def wrong(kernel, seed=0):
        seen.append(kernel.fingerprint)
        raise LogError("wrong results (simulated)")

    monkeypatch.setattr(lookup, "check_kernel", wrong)
    with pytest.warns(TuningLogWarning, match=r"tensor-core kernel for forward-last-g2-k8-o8-float16-bias failed"):
        choice = lookup.kernel_for(spec, target)
    assert seen == ["default"]
    assert choice.fingerprint == "default-simt" and "simulated" in choice.note
    assert lookup.resolve(spec, target).fingerprint == "default-simt"  # remembered: no second check
    lookup.kernel_for(spec, target)
    assert len(seen) == 1


def test_float32_cuda_default_is_not_checked(monkeypatch):
    monkeypatch.setattr(lookup.KERNELS, "get", lambda spec, target, choice, serial=False: choice)
    monkeypatch.setattr(lookup, "check_kernel", lambda *a, **k: pytest.fail("checked"))
    with pytest.warns(UntunedShapeWarning):
        assert lookup.kernel_for(SPEC, cuda_target("sm_90")).fingerprint == "default"


def test_check_catches_a_wrong_kernel():
    fake_log(user_logs_dir(), SPEC, cpu_target())
    kernel = lookup.kernel_for(SPEC, cpu_target())

    class Broken:
        spec, row_tile, choice, target = kernel.spec, kernel.row_tile, kernel.choice, kernel.target

        def __call__(self, *args):
            kernel(*args)
            args[-1][0, 0, 0] += 1.0

    with pytest.raises(LogError, match="wrong results"):
        check.check_kernel(Broken())


def test_fingerprint_follows_the_log_content():
    path = fake_log(user_logs_dir(), SPEC, cpu_target(), seeds=(1, 2))
    first = info()["fingerprint"]
    lines = (path / RECORDS).read_text().splitlines()
    (path / RECORDS).write_text(lines[1] + "\n")  # now the other trace is the best
    lookup.forget()
    second = info()["fingerprint"]
    assert first.startswith("tuned-") and second.startswith("tuned-") and first != second


def test_find_logs_layout():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    (log,) = find_logs(user_logs_dir())
    assert log.path == path and log.rows == 256 and log.space == "template" and log.trials == 3
    assert path.relative_to(user_logs_dir()).parts == (target_key(cpu_target()), SPEC.key, "n256")


def test_kernel_for_call_serves_small_calls_a_serial_build(monkeypatch):
    import torch

    weight = torch.empty(2, 8, 8)
    cpu = torch.device("cpu")
    small = lookup.kernel_for_call("forward", weight, "last", True, cpu, rows=4)
    large = lookup.kernel_for_call("forward", weight, "last", True, cpu, rows=1 << 16)
    assert small.serial and not large.serial
    assert small.choice.fingerprint == large.choice.fingerprint
    assert lookup.kernel_for_call("forward", weight, "last", True, cpu, rows=5) is small
    lookup.forget()  # e.g. a new log: the next call asks kernel_for again
    asked = []
    real = lookup.kernel_for
    monkeypatch.setattr(lookup, "kernel_for", lambda *a, **k: asked.append(k) or real(*a, **k))
    assert lookup.kernel_for_call("forward", weight, "last", True, cpu, rows=5).serial
    assert asked == [{"serial": True}]


def test_random_bytes_in_a_log_are_skipped(capsys):
    import os

    from tvmgroup import cli

    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    (path / RECORDS).write_bytes(os.urandom(4096) + b"\n" + os.urandom(512))
    _expect_fallback("no successfully measured record")
    assert cli.main(["logs"]) == 0
    assert SPEC.key in capsys.readouterr().out


def test_a_small_call_compiles_only_the_serial_build():
    import torch

    from tvmgroup.kernel import KERNELS
    from tvmgroup.target import target_json

    weight = torch.empty(3, 16, 8)  # a shape no other test uses
    kernel = lookup.kernel_for_call("forward", weight, "last", True, torch.device("cpu"), rows=4)
    assert kernel.serial
    built = {key[3] for key in KERNELS._kernels if key[0] == kernel.spec and key[1] == target_json(cpu_target())}
    assert built == {True}


def test_the_tune_command_named_for_an_in_out_weight_parses():
    from tvmgroup.cli import build_parser

    spec = OpSpec("grad_input", 2, 8, 24, layout="ensemble", weight_layout="in_out")
    command = lookup.tune_command(spec, cpu_target())
    assert "--layout ensemble" in command and "--weight-layout in_out" in command
    args = build_parser().parse_args(command.split()[1:])
    assert (args.layout, args.weight_layout) == ("ensemble", "in_out")
    assert "--weight-layout" not in lookup.tune_command(SPEC, cpu_target())


def test_default_schedules_override_a_log_inside_the_context():
    import torch

    from tvmgroup.lookup import default_schedules, kernel_for_call

    fake_log(user_logs_dir(), SPEC, cpu_target())

    weight = torch.randn(2, 8, 8)
    device = torch.device("cpu")
    tuned = kernel_for_call("forward", weight, "last", True, device, 512)
    with default_schedules():
        default = kernel_for_call("forward", weight, "last", True, device, 512)
        assert forward_error(9) < 1e-5
    again = kernel_for_call("forward", weight, "last", True, device, 512)
    assert tuned.choice.origin == "user" and again is tuned
    assert default.choice.origin == "default"
