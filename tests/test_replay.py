"""Tuning logs are data: a trace holding anything a template does not emit is refused.

Each test plants one kind of hostile record into a hand-made log (``fake_log``) by editing
the record file's JSON, whose layout is ``[workload index, [trace, run_secs, target,
args_info]]`` with ``trace = [instructions, decisions]``, an instruction ``[kind, inputs,
attrs, outputs]`` and a decision ``[instruction index, value]``. The lookup must skip the
log with a warning naming the reason, serve the default schedule, and compute correctly.
"""

from __future__ import annotations

import itertools
import json

import pytest
from tvm import s_tir

from tvmgroup.compute import LAYOUTS, OPS, OpSpec, ir_module
from tvmgroup.lookup import TuningLogWarning
from tvmgroup.paths import user_logs_dir
from tvmgroup.schedules import SampledKnobs, structures, supports, template_for
from tvmgroup.schedules.knobs import (
    POSTPROC_INSTRUCTIONS,
    TEMPLATE_ANNOTATIONS,
    TEMPLATE_INSTRUCTIONS,
    TraceRefused,
    check_trace,
    trace_decisions,
)
from tvmgroup.logs import RECORDS
from tvmgroup.target import cpu_target

from tuning_helpers import fake_log, forward_error, fresh_lookup, schedule_info_of

SPEC = OpSpec("forward", 2, 8, 8)
LLVM_IR = 'define void @tvmgroup_evil() {\n  call void @system(i8* null)\n  ret void\n}\n'


fresh = pytest.fixture(autouse=True)(fresh_lookup)


def info(spec: OpSpec = SPEC) -> dict:
    return schedule_info_of(spec)


def plant(edit) -> None:
    """A log for SPEC whose best record (the first: 10 us) is changed by ``edit(insts, decisions)``."""
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    lines = (path / RECORDS).read_text().splitlines()
    index, record = json.loads(lines[0])
    insts, decisions = record[0]
    edit(insts, decisions)
    lines[0] = json.dumps([index, record])
    (path / RECORDS).write_text("\n".join(lines) + "\n")


def position(insts, kind: str, nth: int = 0) -> int:
    return [i for i, inst in enumerate(insts) if inst[0] == kind][nth]


def decision_of(decisions, index: int) -> list:
    (entry,) = [d for d in decisions if d[0] == index]
    return entry


def row_tile_choice(insts) -> int:
    """The SampleCategorical whose value the tvmgroup.row_tile annotation carries."""
    annotate = insts[position(insts, "Annotate")]
    assert annotate[2] == ["tvmgroup.row_tile"]
    (index,) = [i for i, inst in enumerate(insts) if inst[0] == "SampleCategorical" and inst[3] == [annotate[1][1]]]
    return index


def expect_skipped(match: str) -> None:
    with pytest.warns(TuningLogWarning, match=match):
        assert info()["origin"] == "default"
    for n in (1, 7, 300):
        assert forward_error(n) < 1e-5


def add_annotation(key: str, value):
    def edit(insts, decisions):
        block = insts[0][3][0]  # GetSBlock's output
        insts.append(["Annotate", [block, value], [key], []])  # appended: decision indices stay
    return edit


def test_clean_log_is_accepted():
    plant(lambda insts, decisions: None)
    got = info()
    assert got["origin"] == "user" and got["tuned_rows"] == 256
    for n in (1, 7, 300):
        assert forward_error(n) < 1e-5


def test_real_postproc_marker_is_accepted():
    """MetaSchedule records a searched candidate's trace with an EnterPostproc marker."""
    plant(lambda insts, decisions: insts.append(["EnterPostproc", [], [], []]))
    assert info()["origin"] == "user"


@pytest.mark.parametrize("key", ["pragma_import_llvm", "pragma_import_c"])
def test_foreign_import_annotation_is_refused(key):
    plant(add_annotation(key, json.dumps(LLVM_IR)))  # a string input is stored quoted
    expect_skipped(rf"refused: record 1 .*annotation key '{key}' is not one a tvmgroup llvm template uses")


def test_known_key_with_a_string_value_is_refused():
    plant(add_annotation("tvmgroup.row_tile", json.dumps(LLVM_IR)))
    expect_skipped("'tvmgroup.row_tile' has a value no template writes")


def test_cuda_annotation_in_a_cpu_log_is_refused():
    plant(add_annotation("software_pipeline_stage", [0, 0, 1]))
    expect_skipped("annotation key 'software_pipeline_stage' is not one a tvmgroup llvm template uses")


@pytest.mark.parametrize("inst", [
    ["Unannotate", ["b0"], ["tvmgroup.row_tile"], []],
    ["Bind", ["l1"], ["threadIdx.x"], []],  # a CUDA template's instruction, in a CPU log
    ["NoSuchInstruction", [], [], []],
])
def test_foreign_instruction_is_refused(inst):
    plant(lambda insts, decisions: insts.append(inst))
    expect_skipped(rf"no tvmgroup llvm template emits '{inst[0]}' instructions")


@pytest.mark.parametrize("tile, reason", [
    ([1, 100000], r"innermost factor is above 64"),
    ([100000, 1], r"their product is 100000"),  # TVM's parser would silently make it [8, 1]
    ([8, 0], r"factor below 1"),  # TVM divides by it: SIGFPE kills the process
    ([-1, -8], r"factor below 1"),
    ([2, 2, 2], r"has 3 factors, the instruction 2"),
    (4, r"is not a list of integers"),
])
def test_bad_tile_decision_is_refused(tile, reason):
    def edit(insts, decisions):
        decision_of(decisions, position(insts, "SamplePerfectTile"))[1] = tile
    plant(edit)
    expect_skipped(reason)


@pytest.mark.parametrize("index, reason", [
    (99, r"Wrong decision value, where n = 4, but decision is: 99"),  # MetaSchedule's own check
    ([1], r"is not an index"),
])
def test_bad_categorical_decision_is_refused(index, reason):
    def edit(insts, decisions):
        decision_of(decisions, position(insts, "SampleCategorical"))[1] = index
    plant(edit)
    expect_skipped(reason)


def test_row_tile_decision_past_its_candidates_is_refused():
    def edit(insts, decisions):
        decision_of(decisions, row_tile_choice(insts))[1] = 4
    plant(edit)
    expect_skipped(r"Wrong decision value, where n = 4, but decision is: 4")


def test_row_tile_annotation_not_the_sampled_one_is_refused():
    def edit(insts, decisions):
        annotate = insts[position(insts, "Annotate")]
        annotate[1][1] = 3  # a literal row tile instead of the sampled choice
    plant(edit)
    expect_skipped(r"'tvmgroup.row_tile' is not the sampled row tile: 3")


def test_row_tile_candidates_changed_is_refused():
    def edit(insts, decisions):
        insts[row_tile_choice(insts)][2][0] = [1, 2, 4, 3]  # index 3 would claim a tile of 3
        decision_of(decisions, row_tile_choice(insts))[1] = 3
    plant(edit)
    expect_skipped(r"the template chooses among \[1, 2, 4, 8\]")


def test_missing_decision_is_refused():
    def edit(insts, decisions):
        decisions.remove(decision_of(decisions, position(insts, "SamplePerfectTile")))
    plant(edit)
    expect_skipped("a sampling instruction without a decision")


def test_decision_on_a_non_sampling_instruction_is_refused():
    plant(lambda insts, decisions: decisions.append([0, 1]))
    expect_skipped(r"instruction 0 \(GetSBlock\): has a decision")


def test_a_hostile_record_that_is_not_the_best_still_refuses_the_log():
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    lines = (path / RECORDS).read_text().splitlines()
    index, record = json.loads(lines[-1])  # the slowest
    record[0][0].append(["Annotate", ["b0", json.dumps(LLVM_IR)], ["pragma_import_llvm"], []])
    lines[-1] = json.dumps([index, record])
    (path / RECORDS).write_text("\n".join(lines) + "\n")
    expect_skipped(r"record 3 .*'pragma_import_llvm'")


def _template_traces(target_kind: str, dtypes, shapes):
    for op, layout, bias, dtype, (g, k, o) in itertools.product(OPS, LAYOUTS, (True, False), dtypes, shapes):
        if not supports(target_kind, op, layout):
            continue
        spec = OpSpec(op, g, k, o, dtype, layout, bias)
        for structure in range(len(structures(target_kind, op, layout))):
            sch = s_tir.Schedule(ir_module(spec, 256), seed=1)
            template_for(target_kind)(sch, op, layout, bias, SampledKnobs(structure))
            yield spec, sch.trace


def _check_allow_lists(target_kind: str, dtypes, shapes) -> None:
    """Every template trace passes, and every allowed kind and key is one a template emits."""
    kinds, keys = set(), set()
    for spec, trace in _template_traces(target_kind, dtypes, shapes):
        check_trace(trace, target_kind)
        assert trace_decisions(trace, target_kind)
        kinds |= {inst.kind.name for inst in trace.insts}
        keys |= {str(inst.attrs[0]) for inst in trace.insts if inst.kind.name == "Annotate"}
    return kinds, keys


# Small groups; a static vector loop with a remainder (O = 40); large groups (weight panels).
CPU_SHAPES = [(2, 8, 8), (3, 100, 40), (2, 128, 144)]


def test_allow_lists_match_the_cpu_template():
    kinds, keys = _check_allow_lists("llvm", ["float32"], CPU_SHAPES)
    assert kinds == TEMPLATE_INSTRUCTIONS["llvm"] and keys == TEMPLATE_ANNOTATIONS["llvm"]


@pytest.mark.slow
def test_allow_lists_match_the_cuda_templates():
    """Scheduling only (no GPU needed); tensor-core intrinsics take about a minute to import."""
    kinds, keys = _check_allow_lists("cuda", ["float32", "float16", "bfloat16"], [(2, 8, 8), (3, 100, 40)])
    assert kinds == TEMPLATE_INSTRUCTIONS["cuda"] and keys == TEMPLATE_ANNOTATIONS["cuda"]


def test_check_trace_refuses_what_is_not_a_trace():
    for bad in (None, [], [[["GetSBlock"]], []], [[], [[7, 1]]]):
        with pytest.raises(TraceRefused):
            check_trace(bad, "llvm")
    assert "EnterPostproc" in POSTPROC_INSTRUCTIONS
