"""Small model stacks for ``tvmgroup bench --models``: the layer where models use it.

A layer timed alone can look faster than it is inside a model: there it runs between other
ops (activations, layer norms) whose thread pool may still be spinning, and its inputs come
from the op before. Each stack is the block of an ensemble or block-diagonal MLP,

    x (N, G*K) -> grouped K->H -> GELU -> LayerNorm(G*H) -> grouped H->K -> (N, G*K)

(GELU rather than ReLU: the check against float64 needs a smooth activation, since a
ReLU input that rounds to the other side of 0 in float32 flips a whole gradient row),
with both grouped layers built by one formulation of the registry (those taking the
``"last"`` layout), so stacks differ only in how the grouped layers are computed. Each stack
is checked against the same stack in float64 (output, grad of x and of every parameter)
before it is timed.
"""

from __future__ import annotations

import gc
import time
import traceback
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from tvmgroup.bench.formulations import Bmm, Formulation, Instance
from tvmgroup.bench.runner import TOLERANCE, Result, Settings, extended, training_ops
from tvmgroup.bench.shapes import BYTES_PER_ELEMENT, MAX_ELEMENTS, parse_positive_ints
from tvmgroup.bench.timing import Timer, time_calls
from tvmgroup.lookup import UntunedShapeWarning, schedule_info


@dataclass(frozen=True)
class ModelShape:
    """A stack: ``n`` rows, ``groups`` groups, ``in_features`` -> ``hidden`` -> ``in_features``."""

    n: int
    groups: int
    in_features: int
    hidden: int

    @property
    def label(self) -> str:
        return f"N={self.n} G={self.groups} K={self.in_features} H={self.hidden}"

    @property
    def short(self) -> str:
        return f"{self.n},{self.groups},{self.in_features},{self.hidden}"

    def flops(self, backward: bool) -> int:
        """The two grouped layers' multiply-adds (the activation and norm add little)."""
        forward = 2 * 2 * self.n * self.groups * self.in_features * self.hidden
        return 3 * forward if backward else forward

    def to_dict(self) -> dict:
        return asdict(self)


# Blocks of real models: ensemble critics and dynamics models, a block-diagonal MLP, and a
# many-small-groups layer.
DEFAULT_MODELS: tuple[ModelShape, ...] = (
    ModelShape(256, 10, 256, 256),
    ModelShape(256, 7, 200, 200),
    ModelShape(512, 4, 384, 384),
    ModelShape(4096, 32, 64, 64),
)


def parse_model_shape(text: str) -> ModelShape:
    """Parses ``N,G,K,H`` (four positive integers); raises ValueError saying what is wrong."""
    shape = ModelShape(*parse_positive_ints(text, ("N", "G", "K", "H"), "--model-shape"))
    if shape.n * shape.groups * max(shape.in_features, shape.hidden) > MAX_ELEMENTS:
        raise ValueError(f"--model-shape {text!r} is too large (an activation over {MAX_ELEMENTS} elements)")
    return shape


def stack_parameters(shape: ModelShape, seed: int) -> dict[str, Tensor]:
    """The stack's parameters, scaled like nn.Linear's and nn.LayerNorm's initialisation."""
    gen = torch.Generator().manual_seed(seed + 2)
    g, k, h = shape.groups, shape.in_features, shape.hidden

    def uniform(*size: int, fan_in: int) -> Tensor:
        return (torch.rand(*size, generator=gen) * 2 - 1) * fan_in ** -0.5

    return {
        "w1": uniform(g, h, k, fan_in=k), "b1": uniform(g, h, fan_in=k),
        "w2": uniform(g, k, h, fan_in=h), "b2": uniform(g, k, fan_in=h),
        # Not the identity, so a wrong norm gradient shows.
        "norm_weight": 1 + 0.1 * torch.randn(g * h, generator=gen), "norm_bias": 0.1 * torch.randn(g * h, generator=gen),
    }


class Stack:
    """Grouped layer, GELU, LayerNorm, grouped layer; the grouped layers from one formulation."""

    def __init__(self, formulation: Formulation, params: dict[str, Tensor], dtype: torch.dtype = torch.float32):
        p = {name: t.to(dtype) for name, t in params.items()}
        self.first: Instance = formulation.build(p["w1"], p["b1"])
        self.second: Instance = formulation.build(p["w2"], p["b2"])
        self.norm = nn.LayerNorm(p["norm_weight"].numel(), dtype=dtype)
        with torch.no_grad():
            self.norm.weight.copy_(p["norm_weight"])
            self.norm.bias.copy_(p["norm_bias"])

    def __call__(self, x: Tensor) -> Tensor:
        return self.second(self.norm(torch.nn.functional.gelu(self.first(x))))

    def zero_grad(self) -> None:
        self.first.zero_grad()
        self.second.zero_grad()
        self.norm.zero_grad(set_to_none=True)

    def grads(self) -> dict[str, Tensor]:
        (w1, b1), (w2, b2) = self.first.grads(), self.second.grads()
        return {"grad_w1": w1, "grad_b1": b1, "grad_w2": w2, "grad_b2": b2,
                "grad_norm_weight": self.norm.weight.grad, "grad_norm_bias": self.norm.bias.grad}


def run_stack_once(stack: Stack, x: Tensor, grad_y: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        y_inference = stack(x).clone()
    leaf = x.detach().clone().requires_grad_(True)
    stack.zero_grad()
    y = stack(leaf)
    y.backward(grad_y)
    return {"y": y_inference, "y_autograd": y.detach(), "grad_x": leaf.grad, **stack.grads()}


def stack_reference(params: dict[str, Tensor], x: Tensor, grad_y: Tensor) -> dict[str, Tensor]:
    """The stack in float64 (grouped layers as baddbmm), the reference of every formulation."""
    reference = Formulation("float64", "reference", Bmm)
    return run_stack_once(Stack(reference, params, torch.float64), x.double(), grad_y.double())


def _relative_errors(got: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    errors = {}
    for name, value in got.items():
        want = ref["y" if name == "y_autograd" else name]
        if value is None or tuple(value.shape) != tuple(want.shape):
            errors[name] = float("inf")
            continue
        errors[name] = (value.double() - want).abs().max().item() / (want.abs().max().item() or 1.0)
    return errors


@dataclass
class ModelResult:
    shape: ModelShape
    results: list[Result]

    def speedup(self, backward: bool) -> tuple[float, str] | None:
        timed = [r for r in self.results if not r.is_tvmgroup and (r.forward_backward if backward else r.forward)]
        ours = next((r for r in self.results if r.is_tvmgroup and r.forward), None)
        if not timed or ours is None:
            return None
        pick = (lambda r: r.forward_backward.median_ms) if backward else (lambda r: r.forward.median_ms)
        best = min(timed, key=pick)
        return pick(best) / pick(ours), best.name


def schedule_note(shape: ModelShape) -> str:
    """Which schedule served each of tvmgroup's kernels in the stack (default or a log)."""
    layers = ((shape.in_features, shape.hidden), (shape.hidden, shape.in_features))
    origins = {
        f"{op} {k}->{o}": schedule_info(op, shape.groups, k, o)["origin"]
        for k, o in dict.fromkeys(layers) for op in training_ops("cpu", "last")
    }
    if len(set(origins.values())) == 1:
        return f"schedules: {next(iter(origins.values()))}"
    return "schedules: " + ", ".join(f"{op} {origin}" for op, origin in origins.items())


def run_model(shape: ModelShape, formulations: list[Formulation], settings: Settings,
              timer: Timer | None = None, on_done=None) -> ModelResult:
    """Every formulation's stack at ``shape``: checked against float64, then timed in
    interleaved rounds (``settings.rounds``)."""
    params = stack_parameters(shape, settings.seed)
    gen = torch.Generator().manual_seed(settings.seed + 3)
    per_pair = 2 * shape.n * shape.groups * shape.in_features * BYTES_PER_ELEMENT
    count = max(1, min(settings.buffers, (384 << 20) // per_pair))
    buffers = [(torch.randn(shape.n, shape.groups * shape.in_features, generator=gen),
                torch.randn(shape.n, shape.groups * shape.in_features, generator=gen)) for _ in range(count)]
    ref = stack_reference(params, *buffers[0])
    prepared = []
    for formulation in formulations:
        result, steps = _prepare_one(formulation, shape, params, buffers, ref)
        prepared.append((result, steps))
        if steps is None and on_done:
            on_done(result)
    plan = settings.round_plan()
    for number, (warmup, repeats) in enumerate(plan, 1):  # interleaved rounds, as runner.run_shape
        for result, steps in prepared:
            if steps is None:
                continue
            forward, forward_backward = steps
            result.forward = extended(result.forward, time_calls(forward, warmup=warmup, repeats=repeats, timer=timer))
            result.forward_backward = extended(
                result.forward_backward, time_calls(forward_backward, warmup=warmup, repeats=repeats, timer=timer))
            gc.collect()
            if on_done and number == len(plan):
                on_done(result)
    return ModelResult(shape, [result for result, _ in prepared])


def _prepare_one(formulation, shape, params, buffers, ref) -> tuple[Result, tuple | None]:
    """The formulation's stack built and checked: its result, and its (forward,
    forward_backward) steps to time (None where it failed or is wrong)."""
    result = Result(formulation.name, formulation.is_tvmgroup, "ok")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntunedShapeWarning)
            stack = Stack(formulation, params)
            result.errors = _relative_errors(run_stack_once(stack, *buffers[0]), ref)
        if formulation.is_tvmgroup:
            result.message = schedule_note(shape)
    except Exception as err:
        result.status, result.message = "failed", f"{type(err).__name__}: {err}".strip().splitlines()[0][:500]
        traceback.clear_frames(err.__traceback__)
        return result, None
    finally:
        result.setup_s = time.perf_counter() - start
    bad = {k: v for k, v in result.errors.items() if not v <= TOLERANCE}
    if bad:
        result.status = "wrong"
        result.message = "relative error " + ", ".join(f"{k}={v:.1e}" for k, v in bad.items()) + f" > {TOLERANCE:.0e}"
        return result, None
    xs = [x for x, _ in buffers]
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    count = len(xs)

    def forward(i: int) -> None:
        with torch.no_grad():
            stack(xs[i % count])

    def forward_backward(i: int) -> None:
        x = leaves[i % count]
        x.grad = None
        stack.zero_grad()
        stack(x).backward(buffers[i % count][1])

    return result, (forward, forward_backward)


def format_models(model_results: list[ModelResult]) -> str:
    """A table per stack: median times, GFLOP/s of the grouped layers, tvmgroup's speedup."""
    lines = []
    for m in model_results:
        shape = m.shape
        lines += ["", f"stack {shape.label}: grouped {shape.in_features}->{shape.hidden}, GELU, LayerNorm, "
                      f"grouped {shape.hidden}->{shape.in_features}"]
        header = ["formulation", "fwd ms", "GFLOP/s", "fwd+bwd ms", "GFLOP/s", "note"]
        rows = []
        for r in m.results:
            cells = []
            for timing, backward in ((r.forward, False), (r.forward_backward, True)):
                cells += ([f"{timing.median_ms:.3f}", f"{shape.flops(backward) / (timing.median_ms * 1e6):.1f}"]
                          if timing else ["-", "-"])
            note = r.message if (r.status != "ok" or r.is_tvmgroup) else ""
            rows.append([r.name, *cells, f"{r.status.upper()}: {note}" if r.status != "ok" else note])
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:])]
            lines.append(("  " + "  ".join(cells) + ("  " + row[-1] if row[-1] else "")).rstrip())
        texts = []
        for backward, name in ((False, "fwd"), (True, "fwd+bwd")):
            s = m.speedup(backward)
            texts.append(f"{name} {s[0]:.2f}x (vs {s[1]})" if s else f"{name} n/a")
        lines.append("  tvmgroup speedup over the best PyTorch formulation: " + ", ".join(texts))
    return "\n".join(lines).lstrip("\n") + "\n"


def models_to_json(model_results: list[ModelResult]) -> list[dict]:
    out = []
    for m in model_results:
        entry = {"shape": m.shape.to_dict(),
                 "flops": {"forward": m.shape.flops(False), "forward_backward": m.shape.flops(True)},
                 "results": [r.to_dict() for r in m.results], "tvmgroup_speedup": {}}
        for key, backward in (("forward", False), ("forward_backward", True)):
            s = m.speedup(backward)
            entry["tvmgroup_speedup"][key] = {"speedup": s[0], "best_pytorch": s[1]} if s else None
        out.append(entry)
    return out
