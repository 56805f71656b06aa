"""tvmgroup bench on other devices and dtypes, checked without a GPU: the CUDA-event timer with
a fake event class, the registry's choice per device, the tolerance per dtype (it passes every
PyTorch formulation in the half types on the CPU and fails a 5% error), buffers in the dtype,
and the command's errors. The ``gpu`` tests run a tiny bench on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from tvmgroup.bench import formulations as registry
from tvmgroup.bench.machine import measure_ceilings
from tvmgroup.bench.runner import Settings, make_buffers, run_shape, shared_parameters, tolerance_for
from tvmgroup.bench.shapes import DEFAULT_SHAPES, DEFAULT_SHAPES_BY_DEVICE, GPU_SHAPES, Shape, parse_shape
from tvmgroup.bench.timing import CpuTimer, CudaTimer, time_calls, timer_for
from tvmgroup.cli import main

SMALL = Shape(32, 3, 16, 8)
HALF = (torch.bfloat16, torch.float16)


class FakeEvent:
    """Stands in for torch.cuda.Event: a shared log of what was called, and a fixed 2.5 ms."""

    log: list[str] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing, "timing events need enable_timing=True"
        self.name = "start" if not any(e.startswith("new") for e in self.log[-1:]) else "end"
        self.log.append(f"new {self.name}")

    def record(self) -> None:
        self.log.append(f"record {self.name}")

    def synchronize(self) -> None:
        self.log.append(f"synchronize {self.name}")

    def elapsed_time(self, other: "FakeEvent") -> float:
        self.log.append(f"elapsed {self.name}->{other.name}")
        return 2.5


def test_cuda_timer_records_around_the_call_and_waits_for_the_end():
    FakeEvent.log = []
    timer = CudaTimer(event_class=FakeEvent)
    seconds = timer(lambda: FakeEvent.log.append("call"))
    assert seconds == pytest.approx(2.5e-3)
    assert FakeEvent.log == ["new start", "new end", "record start", "call", "record end",
                             "synchronize end", "elapsed start->end"]


def test_time_calls_with_the_cuda_timer_reports_milliseconds():
    FakeEvent.log = []
    timing = time_calls(lambda i: None, warmup=2, repeats=3, timer=CudaTimer(event_class=FakeEvent))
    assert timing.samples_ms == pytest.approx([2.5] * 3)
    assert FakeEvent.log.count("synchronize end") == 3  # warm-up calls are not timed


def test_timer_for_each_device():
    assert isinstance(timer_for("cpu"), CpuTimer)
    cuda = timer_for("cuda")
    assert isinstance(cuda, CudaTimer) and cuda.event_class is torch.cuda.Event
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        timer_for("tpu")


def test_registry_adds_the_gpu_formulations_on_cuda_only():
    cpu = [f.name for f in registry.select(None, "last", "cpu")]
    assert cpu == list(registry.BY_LAYOUT["last"])
    cuda = [f.name for f in registry.select(None, "last", "cuda")]
    assert set(cuda) == set(cpu) | {"autotune-bmm", "grouped-mm"}
    assert [f.name for f in registry.select(None, "conv", "cuda")] == list(registry.BY_LAYOUT["conv"])


def test_gpu_only_formulation_is_skipped_on_the_cpu_with_the_reason():
    result = run_shape(SMALL, [registry.FORMULATIONS["autotune-bmm"]], Settings(0, 1, 1)).results[0]
    assert result.status == "skipped" and "cuda only" in result.message


def test_grouped_mm_is_skipped_where_torch_lacks_it(monkeypatch):
    formulation = registry.FORMULATIONS["grouped-mm"]
    assert formulation.why_not(SMALL, "cuda") is None or not hasattr(torch.nn.functional, "grouped_mm")
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    reason = formulation.why_not(SMALL, "cuda")
    assert reason and "has no torch.nn.functional.grouped_mm" in reason


def test_tolerance_per_dtype():
    assert tolerance_for(torch.float32) == 1e-4
    assert tolerance_for(torch.bfloat16) == pytest.approx(4 * 2**-8)
    assert tolerance_for(torch.float16) == pytest.approx(4 * 2**-11)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        tolerance_for(torch.float64)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["linear-loop", "conv1d", "bmm", "einsum", "vmap", "block-diag", "grouped-mm",
                                  "matmul-conv", "baddbmm-ensemble", "bmm-ensemble", "einsum-ensemble",
                                  "matmul-shared", "baddbmm-shared", "einsum-shared"])
def test_half_type_formulations_pass_the_tolerance(name, dtype):
    """The bound holds for PyTorch's own half-type kernels at a K and N where sums are long."""
    if name == "grouped-mm" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("no grouped_mm in this torch")
    shape = Shape(512, 3, 256, 64)
    formulation = registry.FORMULATIONS[name]
    weight, bias = shared_parameters(shape, 0, "cpu", dtype)
    (x, grad_y), = make_buffers(shape, 1, 0, "cpu", dtype, formulation.layout)
    assert weight.dtype == x.dtype == grad_y.dtype == dtype
    got = registry.run_once(formulation.build(weight, bias), formulation.layout, x, grad_y)
    assert got["y"].dtype == dtype and got["grad_weight"].dtype == dtype
    errors = registry.relative_errors(got, registry.reference(x, weight, bias, grad_y, formulation.layout))
    assert all(e <= tolerance_for(dtype) for e in errors.values()), errors


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_type_error_beyond_the_bound_is_wrong(dtype):
    class Off(registry.Bmm):
        def __call__(self, x):
            return super().__call__(x) * 1.05

    settings = Settings(warmup=0, repeats=1, buffers=1, dtype=dtype)
    result = run_shape(SMALL, [registry.Formulation("off", "5% off", Off)], settings).results[0]
    assert result.status == "wrong" and f"> {tolerance_for(dtype):.0e}" in result.message


def test_buffers_follow_the_dtype_and_its_size():
    (x, gy), = make_buffers(SMALL, 1, 0, "cpu", torch.bfloat16)
    assert x.dtype == gy.dtype == torch.bfloat16 and x.shape == (32, 48)
    # The 384 MB budget counts bytes of the dtype: twice as many half-type pairs fit.
    big = Shape(65536, 8, 128, 128)
    weight, bias = shared_parameters(big, 0, "cpu", torch.float16)
    assert weight.dtype == bias.dtype == torch.float16
    assert big.bytes_moved(False, 2) * 2 == big.bytes_moved(False)


def test_ceilings_in_a_dtype():
    ceilings = measure_ceilings(64, 1, 1, dtype=torch.bfloat16)
    assert ceilings.gemm_dtype == "bfloat16" and ceilings.device == "cpu" and ceilings.sgemm_gflops > 0


def test_gpu_default_shapes_fill_a_chip_and_parse():
    assert DEFAULT_SHAPES_BY_DEVICE["cpu"] == DEFAULT_SHAPES
    assert DEFAULT_SHAPES_BY_DEVICE["cuda"][: len(DEFAULT_SHAPES)] == DEFAULT_SHAPES
    assert {(s.n, s.groups, s.in_features) for s in GPU_SHAPES} >= {(65536, 8, 32), (65536, 8, 64), (65536, 8, 128)}
    for shape in GPU_SHAPES:
        assert parse_shape(shape.short) == shape  # within the size limit


def test_cli_models_on_cuda_is_refused(tmp_path, capsys):
    assert main(["bench", "--models", "--device", "cuda", "--output", str(tmp_path)]) == 2
    assert "--models runs on the CPU only" in capsys.readouterr().err


def test_cli_rejects_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--dtype", "float64"])
    assert exc.value.code == 2 and "--dtype" in capsys.readouterr().err


def test_cli_several_dtypes_write_one_directory_each(tmp_path, capsys):
    code = main(["bench", "--quick", "--shape", "16,2,8,8", "--formulations", "bmm,einsum", "--repeats", "1",
                 "--dtype", "float32", "--dtype", "bfloat16", "--no-chart", "--output", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    for dtype in ("float32", "bfloat16"):
        data = json.loads((tmp_path / dtype / "bench.json").read_text())
        assert data["options"]["dtype"] == dtype and data["ceilings"]["gemm_dtype"] == dtype
        assert [r["status"] for r in data["shapes"][0]["results"]] == ["ok", "ok"]
        assert data["shapes"][0]["bytes"]["forward"] == Shape(16, 2, 8, 8).bytes_moved(False, 2 if dtype != "float32" else 4)
    assert "bfloat16, median of timed calls" in (tmp_path / "bfloat16" / "bench.txt").read_text()


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_tiny_bench_every_formulation(dtype, tmp_path, capsys):
    # torch.compile's are left to scripts/gpu_check.sh (they compile for a minute or more).
    formulations = ",".join(n for n in registry.FORMULATIONS if registry.FORMULATIONS[n].layout == "last"
                            and "compile" not in n and "autotune" not in n)
    code = main(["bench", "--device", "cuda", "--dtype", dtype, "--quick", "--repeats", "2", "--no-chart",
                 "--shape", "256,8,64,64", "--formulations", formulations, "--output", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine"]["gpu_name"] and data["ceilings"]["device"] == "cuda"
    statuses = {r["name"]: r["status"] for r in data["shapes"][0]["results"]}
    assert statuses["tvmgroup"] == "ok" and statuses["bmm"] == "ok", statuses
    assert all(s in ("ok", "skipped", "failed") for s in statuses.values()), statuses
    ours = next(r for r in data["shapes"][0]["results"] if r["name"] == "tvmgroup")
    assert ours["forward"]["median_ms"] > 0


@pytest.mark.gpu
def test_gpu_cuda_timer_sees_queued_work():
    """A kernel that runs long on the GPU but returns at once on the host is timed in full."""
    a = torch.randn(4096, 4096, device="cuda")
    torch.mm(a, a)
    torch.cuda.synchronize()
    one = CudaTimer()(lambda: torch.mm(a, a))
    ten = CudaTimer()(lambda: [torch.mm(a, a) for _ in range(10)])
    assert ten > 5 * one > 0


def test_a_sum_kept_in_bfloat16_exceeds_the_bound():
    """The bound is tight enough to catch a long sum accumulated in the half type itself."""
    gen = torch.Generator().manual_seed(0)
    k = 4096
    x = torch.randn(64, k, generator=gen).bfloat16()
    w = (torch.randn(k, generator=gen) * k**-0.5).bfloat16()
    acc = torch.zeros(64, dtype=torch.bfloat16)
    for i in range(k):
        acc = acc + x[:, i] * w[i]
    errors = registry.relative_errors({"y": acc}, {"y": (x.double() * w.double()).sum(1)})
    assert errors["y"] > tolerance_for(torch.bfloat16)
    fused = (x.float() @ w.float()).bfloat16()  # float32 sums, one rounding: within it
    assert registry.relative_errors({"y": fused}, {"y": (x.double() * w.double()).sum(1)})["y"] <= tolerance_for(torch.bfloat16)


def test_chart_without_matplotlib_is_left_out(monkeypatch, tmp_path):
    """A GPU machine may have no matplotlib: the run still writes its numbers."""
    import builtins

    from tvmgroup.bench.report import write_chart

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_chart(tmp_path / "bench.png", []) is False
    assert not (tmp_path / "bench.png").exists()
