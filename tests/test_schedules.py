"""The schedule templates: the CPU template's row tiles, and CUDA modules that nvcc compiles
for sm_80..sm_90 without a GPU. CUDA numerics run only where a GPU is visible (``gpu``)."""

from __future__ import annotations

import re

import pytest
import torch
import tvm
import tvm_ffi
from tvm import s_tir

from tvmgroup.compute import LAYOUTS, OPS, OpSpec, ir_module
from tvmgroup.schedules import ROW_TILE_KEY, SINGLE_OPS, DefaultKnobs, row_tile_of, supports, template_for
from tvmgroup.target import cuda_target

G, K, O = 3, 5, 4
ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90"]


def _scheduled(
    kind: str, op: str, layout: str, bias: bool = True, tail: bool = False, dtype: str = "float32"
) -> s_tir.Schedule:
    sch = s_tir.Schedule(ir_module(OpSpec(op, G, K, O, dtype=dtype, layout=layout, bias=bias)))
    template_for(kind)(sch, op, layout, bias, DefaultKnobs(), tail=tail)
    return sch


def _tiles_rows(op: str, layout: str, shape: tuple[int, int, int]) -> bool:
    """Whether the CPU schedule tiles the rows: all but grad_weight of "groups_last"
    vectorised across the groups, which sums every row in one sweep (any row count)."""
    from tvmgroup.layouts import layout_of
    from tvmgroup.opdefs import vectorises_groups

    g, k, _ = shape
    return not (op == "grad_weight" and vectorises_groups(layout_of(layout), g, k))



# Every (op, layout) the CPU template schedules (the fused backward is not on every layout).
CPU_CASES = [(op, layout) for op in OPS for layout in LAYOUTS if supports("llvm", op, layout)]
CPU_CASE_IDS = [f"{op}-{layout}" for op, layout in CPU_CASES]
FUSED_LAYOUTS = [layout for layout in LAYOUTS if supports("llvm", "backward", layout)]

def test_template_for_unknown_kind():
    with pytest.raises(ValueError, match=r"no schedule template for target kind 'rocm'; have \['cuda', 'llvm'\]"):
        template_for("rocm")


@pytest.mark.parametrize(("op", "layout"), CPU_CASES, ids=CPU_CASE_IDS)
def test_cpu_template_records_its_row_tile(op, layout):
    main = _scheduled("llvm", op, layout)
    tile = row_tile_of(main.mod)
    tiles = _tiles_rows(op, layout, (G, K, O))
    assert tile > 1 if tiles else tile == 1
    assert (ROW_TILE_KEY in main.mod.script()) == tiles  # no tile recorded: any row count
    assert row_tile_of(_scheduled("llvm", op, layout, tail=True).mod) == 1


def _loop_kinds(sch: s_tir.Schedule) -> set[str]:
    script = sch.mod.script()
    return {kind for kind in ("T.parallel", "T.vectorized", "T.unroll") if kind in script}


@pytest.mark.parametrize(("op", "layout"), CPU_CASES, ids=CPU_CASE_IDS)
def test_cpu_template_serial_variant_has_no_parallel_loop(op, layout):
    from tvmgroup.schedules.cpu import serial_loops

    assert "T.parallel" in _loop_kinds(_scheduled("llvm", op, layout))
    with serial_loops():
        serial = _scheduled("llvm", op, layout)
    assert "T.parallel" not in _loop_kinds(serial) and "T.vectorized" in _loop_kinds(serial)
    assert row_tile_of(serial.mod) == row_tile_of(_scheduled("llvm", op, layout).mod)


@pytest.mark.parametrize("op", ["forward", "grad_input"])
def test_large_groups_read_the_weight_in_panels(op):
    """K and O from PANEL_MIN: the weight operand is copied into (G, J/16, R, 16) panels."""
    from tvmgroup.schedules.cpu import PANEL_LANES, PANEL_MIN

    sch = s_tir.Schedule(ir_module(OpSpec(op, 2, PANEL_MIN, PANEL_MIN + 16)))
    template_for("llvm")(sch, op, "last", True, DefaultKnobs())
    script = sch.mod.script()
    j = (PANEL_MIN + 16 if op == "forward" else PANEL_MIN) // PANEL_LANES
    assert f"(2, {j}, " in script and f", {PANEL_LANES}))" in script
    small = _scheduled("llvm", op, "last").mod.script()
    assert f", {PANEL_LANES}))" not in small


def test_unscheduled_module_has_row_tile_one():
    assert row_tile_of(ir_module(OpSpec("forward", G, K, O))) == 1


@pytest.mark.parametrize(("op", "layout"), CPU_CASES, ids=CPU_CASE_IDS)
def test_cpu_template_is_parallel_and_vectorised(op, layout):
    script = _scheduled("llvm", op, layout).mod.script()
    assert "T.parallel" in script and "T.vectorized" in script


# ---------------------------------------------------------------------------------------------
# CUDA: build with nvcc (no GPU needed)

_OUTPUT = {"forward": "y", "grad_input": "grad_x", "grad_weight": "grad_weight"}
_KERNEL_NAME = re.compile(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", SINGLE_OPS)
def test_cuda_module_builds_with_nvcc_for_every_arch(op, layout, monkeypatch):
    """tvm.compile emits a CUDA import holding the kernel source; nvcc compiles it per arch.

    TVM 0.27 compiles CUDA source when the module is loaded on a device, through the
    ``tvm_callback_cuda_compile`` hook, which reads TVM_CUDA_COMPILE_MODE on every call. The
    test calls that hook itself, under the target, so nvcc really compiles the source.
    """
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    compile_cuda = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    for arch in ARCHS:
        target = cuda_target(arch)
        lib = tvm.compile(_scheduled("cuda", op, layout).mod, target=target).mod
        cuda = [m for m in lib.imports if m.kind == "cuda"]
        assert len(cuda) == 1, [m.kind for m in lib.imports]
        source = cuda[0].inspect_source()
        names = set(_KERNEL_NAME.findall(source))
        assert names and all(n.startswith("main_kernel") for n in names), names
        assert "threadIdx.x" in source
        assert re.search(rf"\b{_OUTPUT[op]}\w*\[", source), f"{op}: the kernel never writes its output"
        host = lib.inspect_source("ll")
        assert "weight_packed" not in host, "a stage runs on the host instead of the GPU"
        with target:
            binary = bytes(compile_cuda(source))
        assert binary[:4] == b"\x50\xed\x55\xba", f"{arch}: nvcc did not return a fatbin"
        assert len(binary) > 1000


def test_cuda_templates_have_no_fused_backward():
    """The fused backward is a CPU schedule: the CUDA family says so, and its template refuses it."""
    assert FUSED_LAYOUTS == ["last", "conv", "ensemble", "heads"]  # groups_last: the two ops
    assert not any(supports("cuda", "backward", layout) for layout in LAYOUTS)
    assert all(supports(kind, op, layout) for kind in ("llvm", "cuda") for op in SINGLE_OPS for layout in LAYOUTS)
    with pytest.raises(ValueError, match="no fused backward"):
        _scheduled("cuda", "backward", "last")


def test_a_layout_the_cpu_template_does_not_name_has_no_fused_backward():
    """A layout added without a fused-backward schedule is unsupported (callers fall back to
    the single ops), and the template refuses it instead of scheduling it wrongly."""
    assert not supports("llvm", "backward", "some_new_layout")
    assert supports("llvm", "forward", "some_new_layout")
    assert not supports("rocm", "forward", "last")
    sch = s_tir.Schedule(ir_module(OpSpec("backward", G, K, O)))
    with pytest.raises(ValueError, match="no fused backward for layout 'some_new_layout'"):
        template_for("llvm")(sch, "backward", "some_new_layout", True, DefaultKnobs())


@pytest.mark.parametrize("layout", FUSED_LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tail", [False, True])
def test_fused_backward_is_each_part_scheduled_as_its_op(layout, bias, tail):
    """The fused backward's blocks are grad_input's and grad_weight's, each under the loops
    (kinds and extents) its op's schedule gives it, in one PrimFunc; its row tile is the
    larger of theirs."""
    fused = _scheduled("llvm", "backward", layout, bias, tail)
    parts = [_scheduled("llvm", op, layout, bias, tail) for op in ("grad_input", "grad_weight")]
    expected = {}
    for part in parts:
        expected.update(_block_loops(part))
    assert _block_loops(fused) == expected
    assert row_tile_of(fused.mod) == max(row_tile_of(p.mod) for p in parts)


def _block_loops(sch: s_tir.Schedule) -> dict[str, list[tuple[str, str]]]:
    """Every block's enclosing loops as (kind, extent), by block name."""
    out, pending = {}, list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:
        block = pending.pop()
        loops = [sch.get(l) for l in sch.get_loops(block)]
        out[sch.get(block).name_hint] = [(str(l.kind), str(l.extent)) for l in loops]
        pending.extend(sch.get_child_blocks(block))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", SINGLE_OPS)
def test_cuda_half_types_build_with_nvcc_on_tensor_cores(op, layout, dtype, monkeypatch):
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    compile_cuda = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    for arch in ("sm_80", "sm_90"):
        target = cuda_target(arch)
        lib = tvm.compile(_scheduled("cuda", op, layout, dtype=dtype).mod, target=target).mod
        (cuda,) = [m for m in lib.imports if m.kind == "cuda"]
        source = cuda.inspect_source()
        assert "nvcuda::wmma::mma_sync" in source, "the GEMM does not run on tensor cores"
        assert "wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>" in source, "the sum is not float32"
        assert ("half" if dtype == "float16" else "nv_bfloat16") in source
        with target:
            assert bytes(compile_cuda(source))[:4] == b"\x50\xed\x55\xba"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", SINGLE_OPS)
def test_cuda_builds_with_an_in_out_weight(op, layout, dtype, monkeypatch):
    """A (G, K, O) weight: SIMT (float32) and tensor-core (float16) kernels build with nvcc."""
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    compile_cuda = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    g, k, o = (G, K, O) if dtype == "float32" else (4, 48, 112)
    sch = s_tir.Schedule(ir_module(OpSpec(op, g, k, o, dtype=dtype, layout=layout, weight_layout="in_out")))
    template_for("cuda")(sch, op, layout, True, DefaultKnobs())
    target = cuda_target("sm_90")
    lib = tvm.compile(sch.mod, target=target).mod
    (cuda,) = [m for m in lib.imports if m.kind == "cuda"]
    source = cuda.inspect_source()
    assert re.search(rf"\b{_OUTPUT[op]}\w*\[", source)
    assert "weight_packed" not in lib.inspect_source("ll"), "a stage runs on the host instead of the GPU"
    if dtype == "float16":
        assert "nvcuda::wmma::mma_sync" in source
    with target:
        assert bytes(compile_cuda(source))[:4] == b"\x50\xed\x55\xba"


@pytest.mark.parametrize(("op", "layout"), CPU_CASES, ids=CPU_CASE_IDS)
def test_cpu_template_with_an_in_out_weight(op, layout):
    for shape in ((G, K, O), (2, 128, 144)):
        sch = s_tir.Schedule(ir_module(OpSpec(op, *shape, layout=layout, weight_layout="in_out")))
        template_for("llvm")(sch, op, layout, True, DefaultKnobs())
        script = sch.mod.script()
        assert "T.parallel" in script and "T.vectorized" in script
        assert row_tile_of(sch.mod) > 1 if _tiles_rows(op, layout, shape) else row_tile_of(sch.mod) == 1


def test_cuda_compile_mode_is_honoured(monkeypatch):
    """Proves the hook reads the variable at call time (so monkeypatch.setenv above applies)."""
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "no-such-compiler")
    compile_cuda = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    with cuda_target("sm_80"), pytest.raises(Exception, match="no-such-compiler"):
        compile_cuda("extern \"C\" __global__ void k() {}")


# ---------------------------------------------------------------------------------------------
# CUDA numerics: only with a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_forward_backward_match_float64(layout, ref_grads, close):
    from tvmgroup import grouped_linear

    shape = {"last": (97, G * K), "conv": (2, G * K, 97), "ensemble": (G, 97, K), "groups_last": (97, K, G), "heads": (97, G, K)}[layout]
    x = torch.randn(shape, device="cuda", requires_grad=True)
    weight = torch.randn(G, O, K, device="cuda", requires_grad=True)
    bias = torch.randn(G, O, device="cuda", requires_grad=True)
    y = grouped_linear(x, weight, bias, layout=layout)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.cuda.synchronize()
    expect = ref_grads(x.cpu(), weight.cpu(), bias.cpu(), grad_y.cpu(), layout)
    close(y.cpu(), *expect["y"], what="cuda y")
    close(x.grad.cpu(), *expect["x"], what="cuda grad_x")
    close(weight.grad.cpu(), *expect["weight"], what="cuda grad_weight")
    close(bias.grad.cpu(), *expect["bias"], what="cuda grad_bias")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_half_types_match_float64(layout, dtype, ref):
    from tvmgroup import grouped_linear

    shape = {"last": (97, G * K), "conv": (2, G * K, 97), "ensemble": (G, 97, K), "groups_last": (97, K, G), "heads": (97, G, K)}[layout]
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(G, O, K, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(G, O, device="cuda", dtype=dtype, requires_grad=True)
    y = grouped_linear(x, weight, bias, layout=layout)
    assert y.dtype == dtype
    y.backward(torch.ones_like(y))
    want = ref(x.cpu(), weight.cpu(), bias.cpu(), layout)
    # Inputs are exact in the half type; sums in float32, one rounding to the half type at the end.
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert torch.allclose(y.double().cpu(), want, rtol=2 * eps, atol=2 * eps * K)
    assert x.grad.dtype == dtype and weight.grad.dtype == dtype and bias.grad.dtype == dtype


@pytest.mark.gpu
def test_cuda_autocast_and_current_stream(ref):
    from tvmgroup import GroupedLinear

    layer = GroupedLinear(G, K, O).cuda()
    x = torch.randn(33, G * K, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    stream.synchronize()
    assert y.dtype == torch.bfloat16
    want = ref(x.cpu(), layer.weight.cpu(), layer.bias.cpu(), "last")
    assert torch.allclose(y.double().cpu(), want, rtol=2**-6, atol=2**-6 * K)


def test_parallel_blocks_divide_the_tiles_and_keep_the_threads_busy():
    from tvmgroup.schedules.cpu import _blocks

    assert _blocks(600, 2) == 2 and _blocks(1, 2) == 1 and _blocks(3, 4) == 3
    assert _blocks(375, 2) == 15  # odd: 15 blocks keep two threads within 7% of each other
    assert _blocks(7, 2) == 7  # a prime: every tile its own block
    for extent in (96, 100, 375, 600, 4096):
        for threads in (1, 2, 3, 8, 16):
            blocks = _blocks(extent, threads)
            assert extent % blocks == 0 and blocks >= min(extent, threads)


@pytest.mark.parametrize("layout", ["last", "ensemble"])
def test_grad_weight_runs_one_parallel_region_over_the_row_chunks(layout):
    """The parallel loop is outermost and the (symbolic) row chunks run inside it: a region
    per chunk would wait at N/16 barriers per call."""
    from tvmgroup.schedules.cpu import schedule_cpu

    sch = s_tir.Schedule(ir_module(OpSpec("grad_weight", 4, 64, 64, layout=layout)))
    schedule_cpu(sch, "grad_weight", layout, True, DefaultKnobs())
    for name in ("grad_weight", "grad_bias"):
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(name + "_update"))]
        assert loops[0].kind == tvm.tirx.ForKind.PARALLEL, name
        assert not any(loop.kind == tvm.tirx.ForKind.PARALLEL for loop in loops[1:]), name
        assert not isinstance(loops[1].extent, tvm.tirx.IntImm), name  # the row chunks
