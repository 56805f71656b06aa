"""A log's best trace as a schedule for the symbolic-row op, and its one-time numerical check.

Tuning runs the template at a fixed row count; the best trace's sampling decisions are fed
back to the same template (:class:`~tvmgroup.schedules.ReplayKnobs`) on the compute with a
symbolic row count. The template samples G/K/O tiles on static loops and row tiles
categorically, so the same decisions are valid there: one tuned log serves every N.
The row tile travels as a block annotation, which :func:`~tvmgroup.kernel.build_kernel`
reads to set up the tail kernel.
"""

from __future__ import annotations

import torch
import tvm
from tvm import s_tir

from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.kernel import Kernel, ScheduleChoice
from tvmgroup.schedules import ReplayKnobs, template_for, trace_decisions
from tvmgroup.tuning.logs import LogError, TuningLog, best_record


def choice_from_log(spec: OpSpec, target: tvm.target.Target, log: TuningLog, origin: str) -> ScheduleChoice:
    """The best schedule in ``log``; :class:`LogError` if it is unusable or does not replay."""
    best = best_record(log, spec)
    template = template_for(target.kind.name)
    decisions = trace_decisions(best.record.trace)

    def apply(sch: s_tir.Schedule) -> None:
        knobs = ReplayKnobs(decisions)
        template(sch, spec.op, spec.layout, spec.bias, knobs)
        knobs.check_used_all()

    try:
        apply(s_tir.Schedule(ir_module(spec)))
    except Exception as err:
        raise LogError(f"{log.path}: its best trace does not replay onto symbolic rows ({err})") from None
    return ScheduleChoice(
        origin,
        apply,
        fingerprint=f"tuned-{tvm.__version__}-{best.digest}",
        log=str(log.path),
        tuned_rows=log.rows,
        note=f"{best.seconds * 1e6:.1f} us at {log.rows} rows",
    )


def _operands(spec: OpSpec, rows: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[int]]:
    """Random inputs and empty outputs (on the CPU) in kernel argument order; the output indices."""
    g, k, o = spec.groups, spec.in_features, spec.out_features

    def act(features: int) -> torch.Tensor:
        shape = (rows, g, features) if spec.layout == "last" else (1, g, features, rows)
        return torch.randn(shape).to(dtype)

    w = torch.randn(g, o, k).to(dtype)
    if spec.op == "forward":
        x = act(k)
        args = [x, w] + ([torch.randn(g, o).to(dtype)] if spec.bias else []) + [torch.empty_like(act(o))]
        return args, [len(args) - 1]
    if spec.op == "grad_input":
        return [act(o), w, torch.empty_like(act(k))], [2]
    args = [act(o), act(k), torch.empty(g, o, k, dtype=dtype)] + ([torch.empty(g, o, dtype=dtype)] if spec.bias else [])
    return args, list(range(2, len(args)))


def _reference(spec: OpSpec, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """The op in float64 (``abs`` of every operand gives the magnitude bound)."""
    a = [t.double() for t in args]
    rows = "n" if spec.layout == "last" else "bl"
    x_ = lambda f: f"{rows[0]}g{f}{rows[1:]}"  # noqa: E731  einsum operand of an activation
    if spec.op == "forward":
        y = torch.einsum(f"{x_('k')},gok->{x_('o')}", a[0], a[1])
        if spec.bias:
            y = y + (a[2][None, :, :] if spec.layout == "last" else a[2][None, :, :, None])
        return [y]
    if spec.op == "grad_input":
        return [torch.einsum(f"{x_('o')},gok->{x_('k')}", a[0], a[1])]
    dw = torch.einsum(f"{x_('o')},{x_('k')}->gok", a[0], a[1])
    if not spec.bias:
        return [dw]
    return [dw, a[0].sum(dim=(0,) if spec.layout == "last" else (0, 3))]


def check_kernel(kernel: Kernel, seed: int = 0, device: str = "cpu") -> None:
    """Runs ``kernel`` on ``device`` on ``2 * row_tile + 3`` random rows against a float64 reference.

    Raises :class:`LogError` naming the worst error if any output is off by more than a few
    roundings of the storage dtype relative to the sum of absolute terms.
    """
    spec = kernel.spec
    dtype = getattr(torch, spec.dtype)
    rows = 2 * kernel.row_tile + 3
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        args, outs = _operands(spec, rows, dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    args = [t.to(device) for t in args]
    for i in outs:
        args[i].fill_(float("nan"))
    kernel(*args)
    args = [t.cpu() for t in args]
    refs = _reference(spec, args)
    mags = _reference(spec, [t.abs() for t in args])
    depth = {"forward": spec.in_features + 1, "grad_input": spec.out_features, "grad_weight": rows}[spec.op]
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    for i, ref, mag in zip(outs, refs, mags):
        got = args[i].double()
        bound = 4 * (depth + 1) * eps * mag + 1e-30
        bad = ~((got - ref).abs() <= bound)
        if bad.any():
            worst = (got - ref).abs().nan_to_num(float("inf")).max().item()
            raise LogError(
                f"schedule from {kernel.choice.log} gives wrong results for {spec.key} at {rows} rows: "
                f"max error {worst:.3e}, allowed about {bound.max().item():.3e}"
            )
