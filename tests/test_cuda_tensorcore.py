"""The tensor-core template (float16/bfloat16): its design space replays onto any row count
and nvcc builds the result for sm_80 and sm_90 without a GPU; with a GPU (``gpu``), every op
matches float64 at row counts on and off the tiles."""

from __future__ import annotations

import pytest
import torch
import tvm
import tvm_ffi
from tvm import s_tir

from tvmgroup import lookup
from tvmgroup.compute import LAYOUTS, OpSpec, ir_module
from tvmgroup.paths import user_logs_dir
from tvmgroup.schedules import SINGLE_OPS, ReplayKnobs, SampledKnobs, template_for
from tvmgroup.schedules.cuda_tensorcore import intrinsics
from tvmgroup.target import cuda_target

from tuning_helpers import fake_log

FATBIN_MAGIC = b"\x50\xed\x55\xba"
HALF = ["float16", "bfloat16"]


def test_intrinsics_refuse_float32():
    with pytest.raises(ValueError, match=r"tensor cores here take \('float16', 'bfloat16'\), got 'float32'"):
        intrinsics("float32")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", SINGLE_OPS)
def test_sampled_schedule_replays_onto_any_rows_and_builds(op, layout, dtype, monkeypatch):
    """A schedule sampled at a fixed row count (as tuning does) replays with its decisions
    onto the symbolic-row compute; nvcc compiles that module for sm_80 and sm_90."""
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    spec = OpSpec(op, 4, 48, 112, dtype, layout)
    template = template_for("cuda")
    tuned = s_tir.Schedule(ir_module(spec, 256), seed=7)
    template(tuned, op, layout, spec.bias, SampledKnobs())
    knobs = ReplayKnobs.from_trace(tuned.trace)
    sch = s_tir.Schedule(ir_module(spec))
    template(sch, op, layout, spec.bias, knobs)
    knobs.check_used_all()
    compile_cuda = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    for arch in ("sm_80", "sm_90"):
        target = cuda_target(arch)
        (cuda,) = [m for m in tvm.compile(sch.mod, target=target).mod.imports if m.kind == "cuda"]
        source = cuda.inspect_source()
        assert "nvcuda::wmma::mma_sync" in source
        with target:
            assert bytes(compile_cuda(source))[:4] == FATBIN_MAGIC, arch


def test_replay_refuses_a_trace_with_other_choices():
    spec = OpSpec("forward", 4, 48, 112, "float16")
    sch = s_tir.Schedule(ir_module(spec))
    with pytest.raises(ValueError, match="more choices than the trace's 1"):
        template_for("cuda")(sch, "forward", "last", True, ReplayKnobs([0]))


# ---------------------------------------------------------------------------------------------
# Numerics: only with a GPU


def _check_half(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, depth: int, what: str) -> None:
    """One rounding to the storage type, plus float32-sum rounding (tensor cores may truncate)."""
    eps = torch.finfo(got.dtype).eps
    bound = eps * ref.abs() + (depth + 1) * 2.0**-20 * mag + 1e-30
    err = (got.double().cpu() - ref).abs()
    assert torch.isfinite(got.double()).all(), f"{what}: non-finite elements"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the bound"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 48, 112), (2, 100, 36), (3, 5, 4)])
def test_forward_backward_match_float64(shape, layout, dtype, ref_grads):
    from tvmgroup import grouped_linear

    g, k, o = shape
    for rows in (1, 7, 300):
        x_shape = {"last": (rows, g * k), "conv": (2, g * k, rows), "ensemble": (g, rows, k),
                   "groups_last": (rows, k, g), "heads": (rows, g, k)}[layout]
        x = torch.randn(x_shape, device="cuda").to(dtype).requires_grad_()
        weight = torch.randn(g, o, k, device="cuda").to(dtype).requires_grad_()
        bias = torch.randn(g, o, device="cuda").to(dtype).requires_grad_()
        y = grouped_linear(x, weight, bias, layout=layout)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
        expect = ref_grads(x.cpu(), weight.cpu(), bias.cpu(), grad_y.cpu(), layout)
        for name, got in (("y", y), ("x", x.grad), ("weight", weight.grad), ("bias", bias.grad)):
            assert got.dtype == dtype
            _check_half(got, *expect[name], what=f"{shape} {layout} {dtype} rows={rows} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("op", SINGLE_OPS)
def test_tuned_log_replays_and_passes_the_check_on_the_gpu(op, tmp_path, monkeypatch):
    from tvmgroup.target import target_for_device

    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path))
    lookup.forget()
    spec = OpSpec(op, 4, 48, 112, "float16")
    target = target_for_device("cuda")
    fake_log(user_logs_dir(), spec, target, seeds=(3,))
    try:
        kernel = lookup.kernel_for(spec, target)  # runs the one-time float64 check on the GPU
        assert kernel.choice.origin == "user"
    finally:
        lookup.forget()
