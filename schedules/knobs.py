"""Knobs: how a schedule template picks its tile sizes.

One template serves several purposes. With :class:`DefaultKnobs` it is the untuned default
schedule; with :class:`SampledKnobs` every choice is a MetaSchedule sampling instruction, so
the template is a MetaSchedule design space; :class:`DefaultTraceKnobs` is the default as a
trace of that space; with :class:`ReplayKnobs` it makes the same choices as a tuned trace, on
any compute of the same op (tuning runs at a fixed row count, kernels take any).

Knobs also carry the loop *structure* (:attr:`Knobs.structure`): where a template has more
than one loop nest for an op (loop order, which loops are joined), each structure is a
design space of its own, since MetaSchedule mutates a trace's decisions but replays its
instructions unchanged. A schedule of any structure but the first records its index as the
block annotation ``STRUCTURE_KEY``, which replay reads back (:func:`trace_structure`).
"""

from __future__ import annotations

import json
from typing import Sequence

import tvm_ffi
from tvm import s_tir, tirx

from .roles import ROW_TILE_BLOCKS_KEY, ROW_TILE_KEY, STRUCTURE_KEY

# The instructions a template's knobs emit, in the order the template calls them.
SAMPLING_INSTRUCTIONS = ("SamplePerfectTile", "SampleCategorical")

# What a tuning log's trace may hold: the instruction kinds and annotation keys the templates
# emit (every op, layout, bias and dtype, on llvm and cuda, with SampledKnobs), and the marker
# MetaSchedule puts before its postprocessors. Replay only reads the trace's decisions, so
# none of these is executed; a trace holding anything else was not made by a template and
# is refused (:func:`check_trace`). A template that starts emitting a new kind or key must
# add it here (``tests/test_replay.py`` checks the lists against the templates' traces).
TEMPLATE_INSTRUCTIONS: dict[str, frozenset[str]] = {
    "llvm": frozenset({
        "AddUnitLoop", "Annotate", "CacheRead", "CacheWrite", "ComputeAt", "DecomposeReduction", "Fuse",
        "GetLoops", "GetProducers", "GetSBlock", "LoopPartition", "Merge", "Parallel", "RFactor", "Reorder",
        "ReverseComputeAt", "SampleCategorical", "SamplePerfectTile", "SetScope", "Split", "TransformLayout",
        "Unroll", "Vectorize",
    }),
    "cuda": frozenset({
        "Annotate", "Bind", "Blockize", "CacheRead", "CacheWrite", "ComputeAt", "ComputeInline",
        "DecomposeReduction", "Fuse", "GetChildBlocks", "GetConsumers", "GetLoops", "GetProducers", "GetSBlock",
        "PadEinsum", "ReIndex", "Reorder", "ReverseComputeAt", "ReverseComputeInline", "SampleCategorical",
        "SamplePerfectTile", "SetScope", "Split", "StorageAlign", "Tensorize", "TransformBlockLayout",
        "TransformLayout", "Unroll", "Vectorize",
    }),
}
POSTPROC_INSTRUCTIONS = frozenset({"EnterPostproc"})  # MetaSchedule's postprocessors here add no others
ALLOWED_INSTRUCTIONS = frozenset().union(*TEMPLATE_INSTRUCTIONS.values(), POSTPROC_INSTRUCTIONS)
TEMPLATE_ANNOTATIONS: dict[str, frozenset[str]] = {
    "llvm": frozenset({ROW_TILE_KEY, ROW_TILE_BLOCKS_KEY, STRUCTURE_KEY}),
    "cuda": frozenset({
        "pragma_auto_unroll_max_step", "pragma_unroll_explicit", "software_pipeline_order",
        "software_pipeline_stage", "tirx.manifest_shared_memory_local_stage", "double_buffer_scope",
    }),
}
ALLOWED_ANNOTATIONS = frozenset().union(*TEMPLATE_ANNOTATIONS.values())
TENSOR_INTRIN_PREFIX = "tvmgroup_wmma_"  # the only intrinsics a template tensorizes with


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Knobs:
    """Interface: factors for splitting loops, and the loop structure they split."""

    structure: int = 0  # index into the template's structures for the op (0: the default one)

    def perfect_tile(self, sch: s_tir.Schedule, loop, n: int, limit: int, default: Sequence[int]) -> list:
        """``n`` factors of a static loop's extent (the first is the outer loop); each inner
        factor is at most ``limit``. ``default`` holds the inner factors the default wants."""
        raise NotImplementedError

    def inner_static(self, sch: s_tir.Schedule, loop, extent: int, limit: int, default: int):
        """Inner factor of a loop with a static extent (always divides it)."""
        raise NotImplementedError

    def inner_choice(self, sch: s_tir.Schedule, candidates: Sequence[int], default: int):
        """Inner factor picked from candidates (for symbolic loops: the tail is predicated)."""
        raise NotImplementedError


class DefaultKnobs(Knobs):
    """Fixed, hand-picked choices: the default schedule."""

    def perfect_tile(self, sch, loop, n, limit, default):
        rest = int(sch.get(loop).extent)
        inner: list[int] = []
        for want in reversed(list(default)[-(n - 1):]):
            factor = max(d for d in _divisors(rest) if d <= min(want, limit))
            inner.insert(0, factor)
            rest //= factor
        return [rest, *inner]

    def inner_static(self, sch, loop, extent, limit, default):
        # Power-of-two factors: other vector lengths compile to gathers.
        bound = min(limit, default)
        return max(d for d in _divisors(extent) if d <= bound and d & (d - 1) == 0)

    def inner_choice(self, sch, candidates, default):
        return default


class SampledKnobs(Knobs):
    """MetaSchedule sampling instructions: the tuning search space (of one structure)."""

    def __init__(self, structure: int = 0) -> None:
        self.structure = structure

    def _decision(self, default_decision, expect):
        """The decision to record (None: sample one); ``default_decision()`` is the default's.
        ``expect`` describes what the template samples here (:class:`_Tile`, :class:`_Choice`)."""
        return None

    def perfect_tile(self, sch, loop, n, limit, default):
        expect = _Tile(int(sch.get(loop).extent), n, limit)
        decision = self._decision(lambda: DefaultKnobs().perfect_tile(sch, loop, n, limit, default), expect)
        return sch.sample_perfect_tile(loop, n=n, max_innermost_factor=limit, decision=decision)

    def inner_static(self, sch, loop, extent, limit, default):
        def default_decision():
            factor = DefaultKnobs().inner_static(sch, loop, extent, limit, default)
            return [extent // factor, factor]

        decision = self._decision(default_decision, _Tile(int(sch.get(loop).extent), 2, limit))
        return sch.sample_perfect_tile(loop, n=2, max_innermost_factor=limit, decision=decision)[1]

    def inner_choice(self, sch, candidates, default):
        candidates = list(candidates)
        probs = [1.0 / len(candidates)] * len(candidates)
        decision = self._decision(lambda: candidates.index(default), _Choice(candidates))
        return sch.sample_categorical(candidates, probs, decision=decision)


class _Tile:
    """A perfect tile the template samples: ``n`` factors of ``extent``, innermost <= ``limit``."""

    def __init__(self, extent: int, n: int, limit: int) -> None:
        self.extent, self.n, self.limit = extent, n, limit

    def check(self, decision) -> None:
        """Raises :class:`ValueError` unless ``decision`` is such a tile.

        MetaSchedule checks none of this for a given decision: it silently rewrites factors
        that do not divide the extent, returns as many factors as the decision has, and a
        zero factor kills the process (SIGFPE).
        """
        what = f"tile decision {decision!r} for a loop of {self.extent} in {self.n} factors"
        if not isinstance(decision, list) or not all(isinstance(f, int) for f in decision):
            raise ValueError(f"{what}: not a list of integers")
        if len(decision) != self.n:
            raise ValueError(f"{what}: {len(decision)} factors")
        if any(f < 1 for f in decision):
            raise ValueError(f"{what}: factors must be positive")
        product = 1
        for f in decision:
            product *= f
        if product != self.extent:
            raise ValueError(f"{what}: their product is {product}")
        if decision[-1] > self.limit:
            raise ValueError(f"{what}: innermost factor above the template's limit {self.limit}")

    def check_sample(self, kind: str, attrs: list) -> None:
        """Raises :class:`ValueError` unless the trace's instruction samples this tile."""
        if kind != "SamplePerfectTile" or list(attrs[:2]) != [self.n, self.limit]:
            raise ValueError(
                f"the trace's {kind} {_short(attrs)} where the template samples a tile in {self.n} "
                f"factors, innermost at most {self.limit}"
            )


class _Choice:
    """A categorical choice the template samples among ``candidates``. MetaSchedule itself
    refuses an index outside them (ValueError "Wrong decision value")."""

    def __init__(self, candidates: list) -> None:
        self.candidates = candidates

    def check(self, decision) -> None:
        if not isinstance(decision, int):
            raise ValueError(f"decision {decision!r} for a choice among {self.candidates}: not an index")

    def check_sample(self, kind: str, attrs: list) -> None:
        """Raises :class:`ValueError` unless the trace's instruction chooses among the same
        candidates (the trace's decision is an index: it means the template's candidate)."""
        if kind != "SampleCategorical" or not attrs or list(attrs[0]) != self.candidates:
            raise ValueError(f"the trace's {kind} {_short(attrs)} where the template chooses among {self.candidates}")


class DefaultTraceKnobs(SampledKnobs):
    """The default schedule as a point of the design space: sampling instructions whose
    decisions are the defaults. Tuning measures it first, so a log never loses to it."""

    def _decision(self, default_decision, expect):
        return default_decision()


class TraceRefused(ValueError):
    """A trace holds something no template emits (see :func:`check_trace`)."""


def check_trace(trace, target_kind: str | None = None) -> None:
    """Raises :class:`TraceRefused` unless ``trace`` holds only what a template emits
    (the template of ``target_kind``, ``"llvm"`` or ``"cuda"``; None: any template).

    ``trace`` is a :class:`~tvm.s_tir.Trace` or its JSON, ``[instructions, decisions]`` as a
    MetaSchedule record stores it (an instruction is ``[kind, inputs, attrs, outputs]``, a
    decision ``[instruction index, value]``). Check the JSON before TVM parses it: parsing a
    record (``TuningRecord.from_json``) applies its trace to a schedule.

    Allowed: instruction kinds in :data:`ALLOWED_INSTRUCTIONS`; ``Annotate`` only with a key
    in :data:`ALLOWED_ANNOTATIONS` and a value that is an integer, a list of integers or a
    variable of the trace (never a string), :data:`ROW_TILE_KEY` only with a
    ``SampleCategorical``'s value, :data:`STRUCTURE_KEY` only with an integer above 0 and
    :data:`ROW_TILE_BLOCKS_KEY` only with a positive integer; ``Tensorize`` only with a
    tvmgroup wmma intrinsic; one decision on every sampling instruction and none elsewhere,
    a categorical one an integer, a tile one as many positive integers as the instruction's
    ``n`` with the innermost within its ``max_innermost_factor``. Whether a decision fits the template (a tile's product is
    its loop's extent) is checked during replay (:class:`ReplayKnobs`).
    """
    if isinstance(trace, s_tir.Trace):
        trace = json.loads(json.dumps(trace.as_json(remove_postproc=False), default=_json_default))
    try:
        insts, decisions = trace
        insts, decisions = list(insts), list(decisions)
    except (TypeError, ValueError):
        raise TraceRefused("not a trace: expected [instructions, decisions]") from None
    if target_kind is None:
        kinds, keys = ALLOWED_INSTRUCTIONS, ALLOWED_ANNOTATIONS
    else:
        kinds = TEMPLATE_INSTRUCTIONS.get(target_kind, frozenset()) | POSTPROC_INSTRUCTIONS
        keys = TEMPLATE_ANNOTATIONS.get(target_kind, frozenset())
    template = "tvmgroup template" if target_kind is None else f"tvmgroup {target_kind} template"
    defined: set[str] = set()  # variables (ExprRV) the instructions so far define
    sampled_choices: set[str] = set()
    for i, inst in enumerate(insts):
        if not (isinstance(inst, list) and len(inst) == 4 and isinstance(inst[0], str)
                and all(isinstance(part, list) for part in inst[1:])):
            raise TraceRefused(f"instruction {i} is not [kind, inputs, attrs, outputs]: {_short(inst)}")
        kind, inputs, attrs, outputs = inst
        where = f"instruction {i} ({kind})"
        if kind not in kinds:
            raise TraceRefused(f"{where}: no {template} emits {kind!r} instructions")
        if kind == "Annotate":
            key = attrs[0] if attrs else None
            if key not in keys:
                raise TraceRefused(f"{where}: annotation key {key!r} is not one a {template} uses")
            value = inputs[1] if len(inputs) == 2 else None
            is_var = isinstance(value, str) and value in defined
            if not (is_var or _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))):
                raise TraceRefused(f"{where}: {key!r} has a value no template writes: {_short(value)}")
            if key == ROW_TILE_KEY and value not in sampled_choices:
                raise TraceRefused(f"{where}: {key!r} is not the sampled row tile: {_short(value)}")
            if key == STRUCTURE_KEY and not (_is_int(value) and value > 0):
                raise TraceRefused(f"{where}: {key!r} is not a structure index above 0: {_short(value)}")
            if key == ROW_TILE_BLOCKS_KEY and not (_is_int(value) and value > 0):
                raise TraceRefused(f"{where}: {key!r} is not a positive integer: {_short(value)}")
        elif kind == "Tensorize":
            intrin = attrs[0] if attrs else None
            if not (isinstance(intrin, str) and intrin.startswith(TENSOR_INTRIN_PREFIX)):
                raise TraceRefused(f"{where}: tensor intrinsic {intrin!r} is not one of tvmgroup's")
        names = [o for o in outputs if isinstance(o, str)]
        defined.update(o for o in names if o.startswith("v"))
        if kind == "SampleCategorical":
            sampled_choices.update(names)
    seen: dict[int, object] = {}
    for entry in decisions:
        if not (isinstance(entry, list) and len(entry) == 2 and _is_int(entry[0]) and 0 <= entry[0] < len(insts)):
            raise TraceRefused(f"decision {_short(entry)} is not [instruction index, value]")
        index, value = entry
        kind, _, attrs, _ = insts[index]
        where = f"instruction {index} ({kind})"
        if kind not in SAMPLING_INSTRUCTIONS:
            raise TraceRefused(f"{where}: has a decision ({_short(value)}) but samples nothing")
        if index in seen:
            raise TraceRefused(f"{where}: two decisions")
        seen[index] = value
        if kind == "SampleCategorical":
            if not _is_int(value):
                raise TraceRefused(f"{where}: decision {_short(value)} is not an index")
        else:
            n, limit = (attrs + [None, None])[:2]
            if not (isinstance(value, list) and value and all(_is_int(f) for f in value)):
                raise TraceRefused(f"{where}: decision {_short(value)} is not a list of integers")
            if len(value) != n:
                raise TraceRefused(f"{where}: decision {_short(value)} has {len(value)} factors, the instruction {n!r}")
            if any(f < 1 for f in value):
                # MetaSchedule divides by every factor: a zero kills the process (SIGFPE).
                raise TraceRefused(f"{where}: decision {_short(value)} has a factor below 1")
            if _is_int(limit) and limit > 0 and value[-1] > limit:
                raise TraceRefused(f"{where}: decision {_short(value)}'s innermost factor is above {limit}")
    for i, inst in enumerate(insts):
        if inst[0] in SAMPLING_INSTRUCTIONS and i not in seen:
            raise TraceRefused(f"instruction {i} ({inst[0]}): a sampling instruction without a decision")


def trace_samples(trace, target_kind: str | None = None) -> list[tuple[str, list]]:
    """``(kind, attrs)`` of a trace's sampling instructions, in order (after
    :func:`check_trace`): a perfect tile's ``[n, max_innermost_factor]``, a categorical
    choice's ``[candidates, probabilities]``."""
    if isinstance(trace, s_tir.Trace):
        trace = json.loads(json.dumps(trace.as_json(remove_postproc=False), default=_json_default))
    check_trace(trace, target_kind)
    return [(inst[0], inst[2]) for inst in trace[0] if inst[0] in SAMPLING_INSTRUCTIONS]


def trace_structure(trace, target_kind: str | None = None) -> int:
    """The template structure a trace was made in (after :func:`check_trace`): the value of
    its ``STRUCTURE_KEY`` annotations, 0 where it has none. Annotations that disagree make
    it :class:`TraceRefused`."""
    if isinstance(trace, s_tir.Trace):
        trace = json.loads(json.dumps(trace.as_json(remove_postproc=False), default=_json_default))
    check_trace(trace, target_kind)
    values = {inst[1][1] for inst in trace[0]
              if inst[0] == "Annotate" and inst[2][:1] == [STRUCTURE_KEY] and len(inst[1]) == 2}
    if len(values) > 1:
        raise TraceRefused(f"the trace names structures {sorted(values)}: one schedule has one")
    return values.pop() if values else 0


def trace_decisions(trace, target_kind: str | None = None) -> list:
    """The decisions of a trace's sampling instructions, in order.

    ``trace``: a :class:`~tvm.s_tir.Trace` or its JSON; :class:`TraceRefused` (after
    :func:`check_trace`) if it holds anything a template does not emit.
    """
    if isinstance(trace, s_tir.Trace):
        check_trace(trace, target_kind)
        insts = [inst for inst in trace.insts if inst.kind.name in SAMPLING_INSTRUCTIONS]
        return [_plain(trace.decisions[inst]) for inst in insts]
    check_trace(trace, target_kind)
    insts, decisions = trace
    by_index = {index: value for index, value in decisions}
    return [_plain(by_index[i]) for i, inst in enumerate(insts) if inst[0] in SAMPLING_INSTRUCTIONS]


def _plain(decision):
    """An FFI decision as Python ints (a tile's factors, or a categorical index)."""
    if hasattr(decision, "__len__"):
        return [int(v) for v in decision]
    return int(decision)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_default(value):
    """Trace.as_json() holds FFI containers and IntImms: as plain JSON values."""
    if isinstance(value, tirx.IntImm):
        return int(value.value)
    if isinstance(value, (tvm_ffi.Array, list, tuple)):
        return list(value)
    return str(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ReplayKnobs(SampledKnobs):
    """The sampling instructions of :class:`SampledKnobs`, with a tuned trace's decisions.

    Raises :class:`ValueError` when the template asks for more choices than the trace made,
    or when a decision does not fit the choice the template makes there (a tile that is not
    a perfect tile of the loop within the template's limit, a list where an index belongs);
    :meth:`check_used_all` tells whether it asked for fewer.
    """

    def __init__(self, decisions: Sequence, samples: Sequence | None = None, structure: int = 0) -> None:
        """``samples``: the trace's sampling instructions (:func:`trace_samples`), each then
        checked to sample what the template samples at that point; ``structure``: the
        trace's (:func:`trace_structure`)."""
        self.structure = structure
        self._decisions = list(decisions)
        self._samples = None if samples is None else list(samples)
        self._next = 0

    @classmethod
    def from_trace(cls, trace, target_kind: str | None = None) -> "ReplayKnobs":
        return cls(trace_decisions(trace, target_kind), trace_samples(trace, target_kind),
                   trace_structure(trace, target_kind))

    def _decision(self, default_decision, expect):
        if self._next >= len(self._decisions):
            raise ValueError(f"the template makes more choices than the trace's {len(self._decisions)}")
        self._next += 1
        decision = self._decisions[self._next - 1]
        if self._samples is not None:
            expect.check_sample(*self._samples[self._next - 1])
        expect.check(decision)
        return decision

    def check_used_all(self) -> None:
        if self._next != len(self._decisions):
            raise ValueError(f"the template made {self._next} choices, the trace {len(self._decisions)}")
