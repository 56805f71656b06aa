"""tvmgroup bench: formulations agree with float64, the timing helper counts right, the outputs
are written, and bad options are refused. No assertions on timings."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from tvmgroup.bench import formulations as registry
from tvmgroup.bench.inputs import INPUT_LAYOUTS
from tvmgroup.bench.runner import TOLERANCE, Settings, make_buffers, run_shape, shared_parameters
from tvmgroup.bench.shapes import DEFAULT_SHAPES, Shape, parse_shape
from tvmgroup.bench.timing import CpuTimer, Timing, time_calls
from tvmgroup.cli import main

SMALL = Shape(24, 3, 5, 4)


@pytest.mark.parametrize("name", list(registry.FORMULATIONS))
def test_formulation_matches_float64_reference(name):
    formulation = registry.FORMULATIONS[name]
    if "cpu" not in formulation.devices:
        pytest.skip(f"{name} runs on {formulation.devices} only (tests/test_bench_device.py checks its math)")
    weight, bias = shared_parameters(SMALL, seed=0)
    (x, grad_y), = make_buffers(SMALL, 1, seed=0, layout=formulation.layout)
    assert x.shape == INPUT_LAYOUTS[formulation.layout].x_shape(SMALL)
    try:
        inst = formulation.build(weight, bias)
        got = registry.run_once(inst, formulation.layout, x, grad_y)
    except Exception as err:  # torch.compile needs a working C++ compiler
        if name == "compile-bmm":
            pytest.skip(f"torch.compile cannot run here: {err}")
        raise
    assert got["y"].shape == (SMALL.n, SMALL.groups * SMALL.out_features)
    assert got["grad_x"].shape == x.shape
    assert got["grad_weight"].shape == weight.shape
    assert got["grad_bias"].shape == bias.shape
    errors = registry.relative_errors(got, registry.reference(x, weight, bias, grad_y, formulation.layout))
    assert set(errors) == {"y", "y_autograd", "grad_x", "grad_weight", "grad_bias"}
    assert all(e <= TOLERANCE for e in errors.values()), errors


def test_wrong_formulation_is_reported_not_timed(monkeypatch):
    class Broken(registry.Bmm):
        def __call__(self, x):
            return super().__call__(x) * 1.01

    broken = registry.Formulation("broken", "scaled output", Broken)
    calls = []
    monkeypatch.setattr("tvmgroup.bench.runner.time_formulation", lambda *a, **k: calls.append(a))
    result = run_shape(SMALL, [broken], Settings(warmup=0, repeats=1, buffers=1)).results[0]
    assert result.status == "wrong" and "relative error" in result.message
    assert result.forward is None and not calls


def test_failing_formulation_is_reported():
    def explode(weight, bias):
        raise RuntimeError("no compiler")

    result = run_shape(SMALL, [registry.Formulation("boom", "fails", explode)],
                       Settings(warmup=0, repeats=1, buffers=1)).results[0]
    assert result.status == "failed" and "no compiler" in result.message


@pytest.mark.parametrize("warmup, repeats, rounds, plan", [
    (3, 20, 4, [(3, 5), (1, 5), (1, 5), (1, 5)]),
    (1, 5, 2, [(1, 3), (1, 2)]),
    (0, 7, 3, [(0, 3), (0, 2), (0, 2)]),
    (2, 2, 5, [(2, 1), (1, 1)]),  # no more rounds than timed calls
    (3, 6, 1, [(3, 6)]),
])
def test_round_plan_spreads_the_repeats(warmup, repeats, rounds, plan):
    settings = Settings(warmup=warmup, repeats=repeats, buffers=1, rounds=rounds)
    assert settings.round_plan() == plan
    assert sum(timed for _, timed in plan) == repeats


def test_formulations_are_timed_in_interleaved_rounds(monkeypatch):
    order = []

    def fake_time(inst, buffers, settings, timer):
        order.append((type(inst).__name__, settings.warmup, settings.repeats))
        sample = Timing([float(len(order))] * settings.repeats)
        return sample, sample

    monkeypatch.setattr("tvmgroup.bench.runner.time_formulation", fake_time)
    chosen = [registry.FORMULATIONS["bmm"], registry.FORMULATIONS["einsum"]]
    done = []
    results = run_shape(SMALL, chosen, Settings(warmup=2, repeats=5, buffers=1, rounds=3),
                        on_done=lambda r: done.append(r.name)).results
    bmm, einsum = (type(f.build(*shared_parameters(SMALL, 0))).__name__ for f in chosen)
    assert order == [(bmm, 2, 2), (einsum, 2, 2), (bmm, 1, 2), (einsum, 1, 2), (bmm, 1, 1), (einsum, 1, 1)]
    assert [len(r.forward.samples_ms) for r in results] == [5, 5]
    assert results[0].forward.samples_ms == [1.0, 1.0, 3.0, 3.0, 5.0]  # its own rounds' samples, in order
    assert done == ["bmm", "einsum"]  # each reported once, after its last round


def test_a_formulation_failing_in_a_later_round_is_reported_and_dropped(monkeypatch):
    calls = []

    def fake_time(inst, buffers, settings, timer):
        calls.append(type(inst).__name__)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        sample = Timing([1.0] * settings.repeats)
        return sample, sample

    monkeypatch.setattr("tvmgroup.bench.runner.time_formulation", fake_time)
    chosen = [registry.FORMULATIONS["bmm"], registry.FORMULATIONS["einsum"]]
    results = run_shape(SMALL, chosen, Settings(warmup=0, repeats=3, buffers=1, rounds=3)).results
    assert results[0].status == "failed" and "out of memory" in results[0].message
    assert results[0].forward is None and results[0].forward_backward is None
    assert results[1].status == "ok" and len(results[1].forward.samples_ms) == 3
    assert len(calls) == 5  # bmm's third round is not run


def test_time_calls_counts_warmup_and_repeats():
    ticks = iter(range(1000))
    seen = []
    timing = time_calls(seen.append, warmup=3, repeats=7, timer=CpuTimer(clock=lambda: next(ticks) * 0.001))
    assert seen == list(range(10))  # warm-up then timed calls, indices counting up
    assert len(timing.samples_ms) == 7
    assert timing.samples_ms == pytest.approx([1.0] * 7)
    assert timing.median_ms == pytest.approx(statistics.median(timing.samples_ms))


def test_timing_summary():
    timing = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert timing.median_ms == 3.0 and timing.min_ms == 1.0
    assert (timing.q1_ms, timing.q3_ms, timing.iqr_ms) == (2.0, 4.0, 2.0)
    assert set(timing.to_dict()) >= {"median_ms", "min_ms", "iqr_ms", "samples_ms"}


def test_buffers_are_random_and_distinct():
    buffers = make_buffers(SMALL, 3, seed=0)
    assert len(buffers) == 3
    assert all(x.abs().min() > 0 and gy.abs().min() > 0 for x, gy in buffers)
    assert not torch.equal(buffers[0][0], buffers[1][0])


def test_shape_counts():
    s = Shape(4096, 32, 64, 64)
    assert s.flops(False) == 2 * 4096 * 32 * 64 * 64
    assert s.flops(True) == 3 * s.flops(False)
    assert s.bytes_moved(True) > s.bytes_moved(False) > 0
    assert parse_shape(" 4096, 32,64 ,64") == s
    assert {(d.n, d.groups, d.in_features) for d in DEFAULT_SHAPES} >= {(4096, 32, 64), (4096, 8, 100), (1024, 100, 16)}


@pytest.mark.parametrize("bad, words", [
    ("4096,32,64", "four"), ("a,2,3,4", "N must be an integer"), ("4,0,3,4", "G must be positive"),
    ("100000000,100,100,100", "too large"),
])
def test_cli_rejects_bad_shape(bad, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--shape", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--shape" in err and words in err


def test_cli_rejects_unknown_formulation(tmp_path, capsys):
    code = main(["bench", "--shape", "8,2,3,4", "--formulations", "bmm,nope", "--output", str(tmp_path)])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_cli_cuda_without_gpu_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "cuda", "--output", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_tiny_run_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["bench", "--quick", "--shape", "64,4,8,8", "--formulations", "bmm,conv1d,tvmgroup",
                 "--repeats", "3", "--rounds", "2", "--output", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "tvmgroup speedup over the best PyTorch formulation" in table
    data = json.loads((out / "bench.json").read_text())
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"] == torch.__version__
    assert data["ceilings"]["sgemm_gflops"] > 0 and data["ceilings"]["copy_gbs"] > 0
    (shape,) = data["shapes"]
    assert shape["shape"] == {"n": 64, "groups": 4, "in_features": 8, "out_features": 8}
    assert [r["name"] for r in shape["results"]] == ["conv1d", "bmm", "tvmgroup"]
    for r in shape["results"]:
        assert r["status"] == "ok", r
        assert len(r["forward"]["samples_ms"]) == 3 and len(r["forward_backward"]["samples_ms"]) == 3
    assert data["options"]["repeats"] == 3 and data["options"]["rounds"] == 2
    assert shape["floors"]["forward"]["floor_ms"] > 0
    assert shape["tvmgroup_speedup"]["forward_backward"]["best_pytorch"] in {"conv1d", "bmm"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.txt").read_text() == table.split("\nwrote ")[0]
    assert "| **tvmgroup** |" in (out / "bench.md").read_text()


def test_conv_layout_run_times_conv_formulations(tmp_path, capsys):
    code = main(["bench", "--layout", "conv", "--shape", "64,4,8,8", "--repeats", "1", "--warmup", "0",
                 "--output", str(tmp_path), "--no-chart"])
    assert code == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    (shape,) = data["shapes"]
    assert [r["name"] for r in shape["results"]] == ["conv1d", "matmul-conv", "tvmgroup-conv"]
    assert all(r["status"] == "ok" for r in shape["results"])
    assert shape["tvmgroup_speedup"]["forward"]["best_pytorch"] in {"conv1d", "matmul-conv"}
    assert data["options"]["layout"] == "conv"


def test_default_selection_follows_layout():
    assert [f.name for f in registry.select(None)] == list(registry.BY_LAYOUT["last"])
    assert {f.layout for f in registry.select(None, "conv")} == {"conv"}


# -- the ensemble and shared layouts ------------------------------------------------------------


def test_every_layout_has_its_run_and_one_tvmgroup_formulation():
    assert set(registry.BY_LAYOUT) == set(INPUT_LAYOUTS)
    assert {f.layout for f in registry.FORMULATIONS.values()} <= set(INPUT_LAYOUTS)
    for layout, names in registry.BY_LAYOUT.items():
        assert all(n in registry.FORMULATIONS for n in names), layout
        assert sum(registry.FORMULATIONS[n].is_tvmgroup for n in names) == 1, layout


@pytest.mark.parametrize("layout", ["ensemble", "shared"])
def test_layout_reference_is_the_plain_float64_layer(layout):
    """The reference through the rows form equals the layer written directly on the layout's
    tensors (y[g] = x[g] @ W[g]^T + b[g]; a shared x is read by every g)."""
    weight, bias = shared_parameters(SMALL, seed=0)
    (x, grad_y), = make_buffers(SMALL, 1, seed=0, layout=layout)
    ref = registry.reference(x, weight, bias, grad_y, layout)
    x64 = x.double().requires_grad_(True)
    w64, b64 = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    xg = x64 if layout == "ensemble" else x64.expand(SMALL.groups, *x64.shape)
    y = torch.einsum("gnk,gok->gno", xg, w64) + b64[:, None, :]
    y.backward(grad_y.double())
    assert ref["grad_x"].shape == x.shape
    torch.testing.assert_close(ref["y"], y.detach().transpose(0, 1).reshape(SMALL.n, -1))
    torch.testing.assert_close(ref["grad_x"], x64.grad)
    torch.testing.assert_close(ref["grad_weight"], w64.grad)
    torch.testing.assert_close(ref["grad_bias"], b64.grad)


def test_shared_input_gradient_of_one_member_is_wrong(monkeypatch):
    """A shared-input formulation whose grad_x misses the sum over the members is caught."""
    class OneMember(registry.MatmulShared):
        def __call__(self, x):
            groups = self.weight.shape[0]
            scaled = x / groups + (x - x / groups).detach()  # the value of x, 1/G of its gradient
            return super().__call__(scaled)

    broken = registry.Formulation("one-member", "grad_x / G", OneMember, layout="shared")
    monkeypatch.setattr("tvmgroup.bench.runner.time_formulation", lambda *a, **k: pytest.fail("timed"))
    result = run_shape(SMALL, [broken], Settings(warmup=0, repeats=1, buffers=1), layout="shared").results[0]
    assert result.status == "wrong" and "grad_x" in result.message
    assert "grad_weight" not in result.message and "y=" not in result.message


def test_ensemble_gradient_in_the_stored_convention_is_wrong():
    """Gradients are compared as (G, O, K): one reported as stored, (G, K, O), does not pass."""
    class AsStored(registry.BaddbmmEnsemble):
        def grads(self):
            return self.weight.grad, self.bias.grad.squeeze(1)

    square = Shape(16, 3, 6, 6)  # the shapes agree, the values do not
    result = run_shape(square, [registry.Formulation("as-stored", "(G, K, O) grad", AsStored, layout="ensemble")],
                       Settings(warmup=0, repeats=1, buffers=1), layout="ensemble").results[0]
    assert result.status == "wrong" and "grad_weight" in result.message


@pytest.mark.parametrize("layout, x_dims, y_dims", [("ensemble", "(G, N, K)", "(G, N, O)"),
                                                    ("shared", "(N, K)", "(G, N, O)"),
                                                    ("shared_last", "(N, K)", "(N, G*O)")])
def test_layout_run_times_its_formulations_and_names_the_layout(layout, x_dims, y_dims, tmp_path, capsys):
    code = main(["bench", "--layout", layout, "--shape", "40,3,8,12", "--repeats", "2", "--warmup", "0",
                 "--output", str(tmp_path), "--no-chart"])
    assert code == 0
    table = capsys.readouterr().out
    assert f"layout {layout}: x {x_dims} -> y {y_dims}" in table
    assert f"Layout {layout}: x {x_dims} -> y {y_dims}." in (tmp_path / "bench.md").read_text()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["options"]["layout"] == layout
    (shape,) = data["shapes"]
    assert shape["layout"] == layout
    assert [r["name"] for r in shape["results"]] == list(registry.BY_LAYOUT[layout])
    for r in shape["results"]:
        assert r["status"] == "ok", r
        assert max(r["relative_errors"].values()) <= TOLERANCE
        assert set(r["relative_errors"]) == {"y", "y_autograd", "grad_x", "grad_weight", "grad_bias"}
        assert len(r["forward_backward"]["samples_ms"]) == 2
    ours = next(r for r in shape["results"] if r["is_tvmgroup"])
    assert ours["name"] == f"tvmgroup-{layout}" and ours["message"].startswith("schedules:")
    assert shape["tvmgroup_speedup"]["forward_backward"]["best_pytorch"] in registry.BY_LAYOUT[layout]
    # The memory floor counts the input the layout reads: N*K for one shared input, N*G*K otherwise.
    x_elements = 40 * 8 if layout.startswith("shared") else 40 * 3 * 8
    assert shape["bytes"]["forward"] == Shape(40, 3, 8, 12).bytes_moved(False, 4, x_elements)


def test_named_formulations_must_belong_to_the_layout_run(tmp_path, capsys):
    assert main(["bench", "--shape", "8,2,3,4", "--formulations", "bmm,tvmgroup-shared",
                 "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tvmgroup-shared (--layout shared)" in err and "--layout last" in err
    assert [f.name for f in registry.select("einsum-shared,tvmgroup-shared", "shared")] == \
        ["einsum-shared", "tvmgroup-shared"]
    assert [f.name for f in registry.select("autotune-bmm,bmm", "last")] == ["bmm", "autotune-bmm"]


def test_compare_default_times_the_layer_on_its_default_schedules_too(tmp_path, monkeypatch, capsys):
    """With a tuning log serving the layer, --compare-default adds tvmgroup-default (the same
    layer forced onto its default schedules) and reports the ratio."""
    from tuning_helpers import fake_log

    from tvmgroup import lookup
    from tvmgroup.compute import OpSpec
    from tvmgroup.paths import user_logs_dir
    from tvmgroup.target import cpu_target

    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path / "home"))
    lookup.forget()
    fake_log(user_logs_dir(), OpSpec("forward", 4, 8, 8), cpu_target())
    try:
        code = main(["bench", "--shape", "64,4,8,8", "--formulations", "bmm,tvmgroup", "--compare-default",
                     "--repeats", "2", "--warmup", "0", "--output", str(tmp_path / "out"), "--no-chart"])
        assert code == 0
        table = capsys.readouterr().out
        data = json.loads((tmp_path / "out" / "bench.json").read_text())
    finally:
        lookup.forget()
    (shape,) = data["shapes"]
    results = {r["name"]: r for r in shape["results"]}
    assert list(results) == ["bmm", "tvmgroup", "tvmgroup-default"]
    assert all(r["status"] == "ok" for r in results.values())
    assert "forward user" in results["tvmgroup"]["message"]  # the log serves the forward
    assert results["tvmgroup-default"]["message"] == "schedules: default (--compare-default)"
    assert results["tvmgroup-default"]["is_default"] and not results["tvmgroup"]["is_default"]
    assert set(shape["tuned_over_default"]) == {"forward", "forward_backward"}
    assert shape["tvmgroup_speedup"]["forward"]["best_pytorch"] == "bmm"  # the default is not a rival
    assert "tvmgroup as looked up (tuning logs) over its default schedules: fwd" in table


def test_compare_default_is_refused_with_models(tmp_path, capsys):
    assert main(["bench", "--models", "--compare-default", "--output", str(tmp_path)]) != 0
    assert "--compare-default times single layers" in capsys.readouterr().err


def test_ceiling_gemm_shrinks_where_one_call_would_take_long():
    from tvmgroup.bench.machine import GEMM_CALL_BUDGET_S, SMALLEST_GEMM, measure_ceilings

    def timer_of(seconds):
        def timer(fn):
            fn()
            return seconds
        return timer

    slow = measure_ceilings(2048, 1, 1, timer=timer_of(GEMM_CALL_BUDGET_S))
    assert slow.sgemm_size == SMALLEST_GEMM
    assert slow.sgemm_gflops == pytest.approx(2 * SMALLEST_GEMM**3 / GEMM_CALL_BUDGET_S / 1e9)
    assert measure_ceilings(4 * SMALLEST_GEMM, 1, 1, timer=timer_of(1e-6)).sgemm_size == 4 * SMALLEST_GEMM
