"""Loop structures of the CPU template: each is a design space of its own, and a tuned trace
replays in the structure it was made in. The first beyond the default: the fused backward
in one pass over grad_y ("last" layout)."""

from __future__ import annotations

import json

import pytest
import torch
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tvmgroup import check, lookup
from tvmgroup.choice import ScheduleChoice
from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.kernel import build_kernel
from tvmgroup.paths import user_logs_dir
from tvmgroup.schedules import (
    STRUCTURE_KEY,
    DefaultKnobs,
    ReplayKnobs,
    SampledKnobs,
    structures,
    template_for,
    trace_structure,
)
from tvmgroup.schedules.cpu import ONE_PASS_CHUNKS, PARALLEL_BLOCKS, ROW_MULTIPLE
from tvmgroup.schedules.roles import ROW_TILE_BLOCKS_KEY, row_tile_of
from tvmgroup.schedules.knobs import TraceRefused, _json_default, trace_decisions
from tvmgroup.target import cpu_target
from tvmgroup.tuning.space import template_space

from tuning_helpers import fake_log, fresh_lookup

ONE_PASS_GROUPS = structures("llvm", "backward", "last").index("one_pass_groups")
ONE_PASS_ROWS = structures("llvm", "backward", "last").index("one_pass_rows")


def one_pass_kernel(spec: OpSpec, structure: int):
    class Knobs(DefaultKnobs):
        pass

    Knobs.structure = structure

    def apply(sch: s_tir.Schedule) -> None:
        template_for("llvm")(sch, spec.op, spec.layout, spec.bias, Knobs())

    return build_kernel(spec, cpu_target(), ScheduleChoice("default", apply, f"structure-{structure}-test"))


def trace_json(spec: OpSpec, structure: int, seed: int = 1) -> list:
    sch = s_tir.Schedule(ir_module(spec, 256), seed=seed)
    template_for("llvm")(sch, spec.op, spec.layout, spec.bias, SampledKnobs(structure))
    return json.loads(json.dumps(sch.trace.as_json(remove_postproc=False), default=_json_default))


def test_structures_list_the_default_first():
    assert structures("llvm", "backward", "last") == ("parts", "one_pass_groups", "one_pass_rows")
    for op, layout in (("forward", "last"), ("grad_weight", "last"), ("backward", "conv")):
        assert structures("llvm", op, layout) == ("default",)
    assert structures("cuda", "backward", "last") == ("default",)


@pytest.mark.parametrize("structure", [ONE_PASS_GROUPS, ONE_PASS_ROWS])
@pytest.mark.parametrize("bias,weight_layout", [(True, "out_in"), (False, "out_in"), (True, "in_out")])
@pytest.mark.parametrize("groups,k,o", [(3, 16, 16), (4, 24, 40), (2, 128, 144)])
def test_one_pass_backward_matches_float64(structure, groups, k, o, bias, weight_layout):
    """Checked at 2 * row_tile + 3 rows: the main kernel and the tail build both run. With
    grad_bias, the rows structure's final sums must run after the joined loop (a wrong
    order gave errors of 30 and more)."""
    spec = OpSpec("backward", groups, k, o, layout="last", bias=bias, weight_layout=weight_layout)
    kernel = one_pass_kernel(spec, structure)
    chunk = 8  # the default's
    assert kernel.row_tile == (chunk if structure == ONE_PASS_GROUPS else chunk * PARALLEL_BLOCKS)
    assert kernel.tail is not None
    check.check_kernel(kernel, seed=groups)


@pytest.mark.parametrize("structure", [ONE_PASS_GROUPS, ONE_PASS_ROWS])
def test_one_pass_backward_below_one_chunk_runs_the_tail_build(structure):
    spec = OpSpec("backward", 3, 16, 16, layout="last")
    kernel = one_pass_kernel(spec, structure)
    tensors, outs = spec.op_def.operands(spec, spec.layout_def, 5, torch.float32)
    refs = spec.op_def.reference_outputs(spec, spec.layout_def, tensors)
    assert check.relative_error(kernel, tensors, outs, refs) < 1e-5


def test_a_structure_the_template_lacks_is_refused():
    spec = OpSpec("forward", 2, 8, 8)
    sch = s_tir.Schedule(ir_module(spec))

    class Second(DefaultKnobs):
        structure = 1

    with pytest.raises(ValueError, match=r"structure 1 of forward on layout 'last': the CPU template has 1"):
        template_for("llvm")(sch, "forward", "last", True, Second())


def test_tuning_rows_fit_every_row_tile_of_the_one_pass_structures():
    assert ROW_MULTIPLE % (PARALLEL_BLOCKS * 64) == 0 and ROW_MULTIPLE % 256 == 0


def test_the_tuning_space_has_a_design_space_per_structure():
    target = cpu_target()
    for op, count in (("backward", 3), ("forward", 1)):
        spec = OpSpec(op, 4, 16, 16)
        space = template_space(spec, target)
        context = ms.TuneContext(mod=ir_module(spec, 256), target=target, space_generator=space, rand_state=1)
        spaces = context.generate_design_space()
        assert len(spaces) == count
        assert [trace_structure(s.trace, "llvm") for s in spaces] == list(range(count))


@pytest.mark.parametrize("structure", [ONE_PASS_GROUPS, ONE_PASS_ROWS])
def test_a_trace_names_its_structure_and_replays_in_it(structure):
    spec = OpSpec("backward", 4, 16, 16)
    raw = trace_json(spec, structure)
    assert trace_structure(raw, "llvm") == structure
    assert trace_structure(trace_json(spec, 0), "llvm") == 0  # the default names none
    knobs = ReplayKnobs.from_trace(raw, "llvm")
    sch = s_tir.Schedule(ir_module(spec))
    template_for("llvm")(sch, "backward", "last", True, knobs)
    knobs.check_used_all()
    assert f'"{STRUCTURE_KEY}": {structure}' in sch.mod.script()


def _structure_annotation(raw: list) -> list:
    (inst,) = [i for i in raw[0] if i[0] == "Annotate" and i[2] == [STRUCTURE_KEY]]
    return inst


@pytest.mark.parametrize("value", [0, -1, "1", [1]])
def test_a_structure_annotation_that_is_not_an_index_above_0_is_refused(value):
    raw = trace_json(OpSpec("backward", 4, 16, 16), ONE_PASS_GROUPS)
    _structure_annotation(raw)[1][1] = value
    with pytest.raises(TraceRefused, match="structure"):
        trace_structure(raw, "llvm")


@pytest.mark.parametrize("value", [0, "v1", 2.5])
def test_a_row_tile_blocks_annotation_that_is_not_a_positive_integer_is_refused(value):
    raw = trace_json(OpSpec("backward", 4, 16, 16), ONE_PASS_ROWS)
    first = [i for i in raw[0] if i[0] == "Annotate" and i[2] == [ROW_TILE_BLOCKS_KEY]][0]
    first[1][1] = value
    with pytest.raises(TraceRefused, match="row_tile_blocks"):
        trace_structure(raw, "llvm")


def test_the_rows_structure_row_tile_is_a_chunk_per_parallel_block():
    spec = OpSpec("backward", 4, 16, 16)
    sch = s_tir.Schedule(ir_module(spec))
    raw = trace_json(spec, ONE_PASS_ROWS)
    template_for("llvm")(sch, "backward", "last", True, ReplayKnobs.from_trace(raw, "llvm"))
    chunk = ONE_PASS_CHUNKS[trace_decisions(raw, "llvm")[0]]  # the structure samples its chunk first
    assert row_tile_of(sch.mod) == chunk * PARALLEL_BLOCKS


def test_two_structure_annotations_that_disagree_are_refused():
    raw = trace_json(OpSpec("backward", 4, 16, 16), ONE_PASS_GROUPS)
    block = _structure_annotation(raw)[1][0]
    raw[0].append(["Annotate", [block, ONE_PASS_GROUPS + 1], [STRUCTURE_KEY], []])
    with pytest.raises(TraceRefused, match="structures"):
        trace_structure(raw, "llvm")


fresh = pytest.fixture(fresh_lookup)


@pytest.mark.parametrize("structure", [ONE_PASS_GROUPS, ONE_PASS_ROWS])
def test_a_log_of_a_one_pass_structure_serves_and_computes(fresh, structure):
    spec = OpSpec("backward", 3, 16, 16)
    fake_log(user_logs_dir(), spec, cpu_target(), seeds=(5,), structure=structure)
    kernel = lookup.kernel_for(spec, cpu_target())
    assert kernel.choice.origin == "user"
    sch = s_tir.Schedule(ir_module(spec))
    kernel.choice.apply(sch)  # the schedule lookup serves: the log's, in its structure
    assert f'"{STRUCTURE_KEY}": {structure}' in sch.mod.script()
    check.check_kernel(kernel, seed=3)
