"""Runs the benchmark: per shape, each formulation is built, checked against float64, then timed.

A formulation that fails to build or run is recorded as ``failed``, one whose results differ
from the reference as ``wrong``; neither is timed, and the run goes on.

The formulations of a shape are timed in interleaved rounds (:attr:`Settings.rounds`): each
round times every formulation for its share of the calls. A machine whose speed drifts over
seconds (a shared host, clock changes) then slows every formulation alike, instead of
whichever one was being timed at the time: the ratios between them are what the run reports.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from tvmgroup.bench.formulations import (
    Formulation,
    Instance,
    reference,
    relative_errors,
    run_once,
)
from tvmgroup.bench.inputs import input_layout
from tvmgroup.bench.shapes import Shape
from tvmgroup.bench.timing import Timer, Timing, time_calls
from tvmgroup.lookup import UntunedShapeWarning, schedule_info

# Largest allowed max|got - ref| / max|ref| for float32 results.
TOLERANCE = 1e-4

# Unit roundoff of the half types: 2^-8 for bfloat16 (8 significand bits), 2^-11 for float16.
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tolerance_for(dtype: torch.dtype) -> float:
    """The largest max|got - ref| / max|ref| accepted for results in ``dtype``.

    float32: :data:`TOLERANCE`. bfloat16 / float16 with float32 sums: the reference runs in
    float64 on the same rounded inputs, so what is left is the rounding of results to the
    dtype, at most one unit roundoff u of the largest element per rounding, with two roundings
    where the bias is added in an op of its own (a product rounded, then the sum), plus float32
    summation error (about sqrt(K or N) * 2^-24, far below u). The bound is 4u: twice the worst
    case of two roundings; 1.6e-2 for bfloat16, 2.0e-3 for float16. The error of a sum kept in
    the half type grows with its length and exceeds it on long sums.
    """
    if dtype == torch.float32:
        return TOLERANCE
    if dtype in _UNIT_ROUNDOFF:
        return 4 * _UNIT_ROUNDOFF[dtype]
    raise ValueError(f"no tolerance for dtype {dtype}; expected float32, bfloat16 or float16")

# Input buffers per shape are capped at this many bytes in all.
BUFFER_BUDGET_BYTES = 384 << 20


@dataclass
class Settings:
    warmup: int  # untimed calls before a formulation's first round (one before each later round)
    repeats: int  # timed calls per formulation and pass, over all rounds
    buffers: int
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    rounds: int = 1  # interleaved rounds the repeats are spread over (at most ``repeats``)

    def round_plan(self) -> list[tuple[int, int]]:
        """(warm-up calls, timed calls) of each round: the repeats spread evenly."""
        rounds = max(1, min(self.rounds, self.repeats))
        base, extra = divmod(self.repeats, rounds)
        return [(self.warmup if i == 0 else min(self.warmup, 1), base + (i < extra)) for i in range(rounds)]


@dataclass
class Result:
    """One formulation at one shape."""

    name: str
    is_tvmgroup: bool
    status: str  # "ok", "wrong", "failed" or "skipped"
    message: str = ""
    errors: dict[str, float] = field(default_factory=dict)
    setup_s: float = 0.0  # build + check, which includes any compilation
    forward: Timing | None = None
    forward_backward: Timing | None = None
    is_default: bool = False  # tvmgroup on its default schedules (--compare-default)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "is_tvmgroup": self.is_tvmgroup,
            "is_default": self.is_default,
            "status": self.status,
            "message": self.message,
            "relative_errors": self.errors,
            "setup_s": self.setup_s,
            "forward": self.forward.to_dict() if self.forward else None,
            "forward_backward": self.forward_backward.to_dict() if self.forward_backward else None,
        }


@dataclass
class ShapeResult:
    shape: Shape
    results: list[Result]
    layout: str = "last"  # the run's input layout (what the memory floor counts)

    def best_pytorch(self, backward: bool) -> Result | None:
        """The fastest PyTorch formulation that ran correctly, by median."""
        timed = [r for r in self.results if not r.is_tvmgroup and _timing(r, backward)]
        return min(timed, key=lambda r: _timing(r, backward).median_ms, default=None)

    def tvmgroup(self) -> Result | None:
        """tvmgroup as a user runs it (with the tuning logs there are)."""
        return next((r for r in self.results if r.is_tvmgroup and not r.is_default), None)

    def tuned_over_default(self, backward: bool) -> float | None:
        """tvmgroup's default-schedule median over its own (``--compare-default``)."""
        ours = self.tvmgroup()
        default = next((r for r in self.results if r.is_default), None)
        if ours is None or default is None or _timing(ours, backward) is None or _timing(default, backward) is None:
            return None
        return _timing(default, backward).median_ms / _timing(ours, backward).median_ms

    def speedup(self, backward: bool) -> tuple[float, str] | None:
        """(best PyTorch median / tvmgroup median, name of that PyTorch formulation)."""
        best, ours = self.best_pytorch(backward), self.tvmgroup()
        if best is None or ours is None or _timing(ours, backward) is None:
            return None
        return _timing(best, backward).median_ms / _timing(ours, backward).median_ms, best.name


def _timing(result: Result, backward: bool) -> Timing | None:
    return result.forward_backward if backward else result.forward


def make_buffers(shape: Shape, count: int, seed: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, layout: str = "last") -> list[tuple[Tensor, Tensor]]:
    """``count`` pairs of fresh standard-normal contiguous (x, grad_y) in ``layout``'s shapes on
    ``device`` in ``dtype``, within the buffer budget (drawn in float32 by a generator on
    ``device``, then rounded)."""
    rows = input_layout(layout)
    x_shape, y_shape = rows.x_shape(shape), rows.y_shape(shape)
    element_size = torch.empty((), dtype=dtype).element_size()
    per_pair = (math.prod(x_shape) + math.prod(y_shape)) * element_size
    count = max(1, min(count, BUFFER_BUDGET_BYTES // max(per_pair, 1)))
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(size: tuple[int, ...]) -> Tensor:
        return torch.randn(*size, generator=gen, device=device).to(dtype)

    return [(draw(x_shape), draw(y_shape)) for _ in range(count)]


def shared_parameters(shape: Shape, seed: int, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """One weight (G, O, K) and bias (G, O), scaled like nn.Linear's initialisation."""
    gen = torch.Generator().manual_seed(seed + 1)
    scale = shape.in_features ** -0.5
    weight = torch.randn(shape.groups, shape.out_features, shape.in_features, generator=gen) * scale
    bias = torch.randn(shape.groups, shape.out_features, generator=gen) * scale
    return weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)


def check(inst: Instance, formulation: Formulation, x: Tensor, grad_y: Tensor,
          ref: dict[str, Tensor]) -> dict[str, float]:
    return relative_errors(run_once(inst, formulation.layout, x, grad_y), ref)


def time_formulation(inst: Instance, buffers: list[tuple[Tensor, Tensor]],
                     settings: Settings, timer: Timer | None) -> tuple[Timing, Timing]:
    """Forward (without autograd) and forward+backward (grads of x, weight and bias) timings,
    ``settings.warmup`` untimed and ``settings.repeats`` timed calls each, on ``buffers`` in
    the formulation's layout."""
    xs = [x.detach().clone() for x, _ in buffers]
    gys = [gy for _, gy in buffers]
    count = len(xs)

    def forward(i: int) -> None:
        with torch.no_grad():
            inst(xs[i % count])

    with inst.schedules():
        forward_timing = time_calls(forward, warmup=settings.warmup, repeats=settings.repeats, timer=timer)

    leaves = [x.requires_grad_(True) for x in xs]

    def forward_backward(i: int) -> None:
        x = leaves[i % count]
        x.grad = None
        inst.zero_grad()
        inst(x).backward(gys[i % count])

    with inst.schedules():
        backward_timing = time_calls(forward_backward, warmup=settings.warmup, repeats=settings.repeats, timer=timer)
    return forward_timing, backward_timing


def training_ops(device: str, layout: str) -> tuple[str, ...]:
    """The ops a forward+backward step with every gradient runs: the fused backward where
    the device's template has it on ``layout``, else grad_input and grad_weight."""
    from tvmgroup.ops import fuses_backward

    return ("forward", "backward") if fuses_backward(device, layout) else ("forward", "grad_input", "grad_weight")


def schedule_origins(shape: Shape, layout: str = "last", weight_layout: str = "out_in", device: str = "cpu") -> str:
    """Where tvmgroup's kernels for ``shape`` (those a training step runs) come from:
    "default" or a tuning log."""
    origins = {
        op: schedule_info(op, shape.groups, shape.in_features, shape.out_features, layout=layout,
                          weight_layout=weight_layout, device=device)["origin"]
        for op in training_ops(device, layout)
    }
    if len(set(origins.values())) == 1:
        return f"schedules: {next(iter(origins.values()))}"
    return "schedules: " + ", ".join(f"{op} {origin}" for op, origin in origins.items())


def prepare_formulation(formulation: Formulation, shape: Shape, weight: Tensor, bias: Tensor,
                        buffers: list[tuple[Tensor, Tensor]], ref: dict[str, Tensor],
                        settings: Settings) -> tuple[Result, Instance | None]:
    """Builds ``formulation`` and checks it against ``ref``: its result, and the instance to
    time (None where it is skipped, failed or wrong)."""
    result = Result(formulation.name, formulation.is_tvmgroup, "ok", is_default=formulation.is_default)
    reason = formulation.why_not(shape, settings.device)
    if reason:
        result.status, result.message = "skipped", reason
        return result, None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # The table says which schedules served tvmgroup (note column) instead.
            warnings.simplefilter("ignore", UntunedShapeWarning)
            inst = formulation.build(weight, bias)
            with inst.schedules():
                result.errors = check(inst, formulation, *buffers[0], ref)
        if formulation.is_default:
            result.message = "schedules: default (--compare-default)"
        elif formulation.is_tvmgroup:
            result.message = schedule_origins(shape, inst.kernel_layout, inst.weight_layout, settings.device)
    except Exception as err:  # a formulation that cannot run here is reported, not fatal
        result.status = "failed"
        result.message = f"{type(err).__name__}: {err}".strip().splitlines()[0][:500]
        result.setup_s = time.perf_counter() - start
        traceback.clear_frames(err.__traceback__)
        return result, None
    result.setup_s = time.perf_counter() - start
    tolerance = tolerance_for(settings.dtype)
    bad = {k: v for k, v in result.errors.items() if not v <= tolerance}  # NaN counts as bad
    if bad:
        result.status = "wrong"
        result.message = "relative error " + ", ".join(f"{k}={v:.1e}" for k, v in bad.items()) + \
            f" > {tolerance:.0e}"
        return result, None
    return result, inst


def time_round(result: Result, inst: Instance, buffers: list[tuple[Tensor, Tensor]], settings: Settings,
               warmup: int, repeats: int, timer: Timer | None) -> bool:
    """One round of ``result``'s formulation: its samples are added to ``result``; False (and
    the result marked failed) if a call raised."""
    try:
        forward, forward_backward = time_formulation(
            inst, buffers, dataclasses.replace(settings, warmup=warmup, repeats=repeats), timer)
    except Exception as err:
        result.status, result.forward, result.forward_backward = "failed", None, None
        result.message = f"while timing: {type(err).__name__}: {err}".strip().splitlines()[0][:500]
        traceback.clear_frames(err.__traceback__)
        return False
    result.forward = extended(result.forward, forward)
    result.forward_backward = extended(result.forward_backward, forward_backward)
    return True


def extended(timing: Timing | None, more: Timing) -> Timing:
    """``timing``'s samples followed by ``more``'s (a later round's)."""
    return more if timing is None else Timing(timing.samples_ms + more.samples_ms)


def run_shape(shape: Shape, formulations: list[Formulation], settings: Settings,
              timer: Timer | None = None, on_start: Callable[[str], None] | None = None,
              on_done: Callable[[Result], None] | None = None, layout: str = "last") -> ShapeResult:
    """All formulations at one shape: each built and checked, then the ones that passed timed
    in interleaved rounds. ``on_start(what)`` names each step as it starts; ``on_done(result)``
    follows each formulation's last step (its check where it is not timed, else its last round).

    Each input layout among the formulations gets its own buffers and float64 reference, from
    the same weight and bias; ``layout`` is the run's (``--layout``)."""
    weight, bias = shared_parameters(shape, settings.seed, settings.device, settings.dtype)
    inputs = {}
    for name in dict.fromkeys(f.layout for f in formulations):
        buffers = make_buffers(shape, settings.buffers, settings.seed, settings.device, settings.dtype, name)
        x0, grad_y0 = buffers[0]
        inputs[name] = buffers, reference(x0, weight, bias, grad_y0, name)
    results, timed = [], []
    for formulation in formulations:
        if on_start:
            on_start(formulation.name)
        buffers, ref = inputs[formulation.layout]
        result, inst = prepare_formulation(formulation, shape, weight, bias, buffers, ref, settings)
        results.append(result)
        if inst is None:
            if on_done:
                on_done(result)
        else:
            timed.append((result, inst, buffers))
    plan = settings.round_plan()
    for number, (warmup, repeats) in enumerate(plan, 1):
        for result, inst, buffers in timed:
            if result.status != "ok":
                continue
            if on_start:
                on_start(result.name if len(plan) == 1 else f"{result.name} round {number}/{len(plan)}")
            ok = time_round(result, inst, buffers, settings, warmup, repeats, timer)
            gc.collect()
            if settings.device == "cuda":
                torch.cuda.empty_cache()  # the next formulation starts with the memory this one held
            if on_done and (not ok or number == len(plan)):
                on_done(result)
    return ShapeResult(shape, results, layout)
