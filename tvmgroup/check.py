"""The first-use check of a kernel: a few random rows against the op's float64 reference.

Tuned schedules (and kernels whose code path the tests cannot reach, like tensor cores on a
machine without a GPU) run it once per process before they serve; a failure makes lookup
fall back to the next schedule. Operands are made on the target family's device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from tvmgroup.kernel import Kernel
from tvmgroup.logs import LogError
from tvmgroup.target import family_of


def check_kernel(kernel: Kernel, seed: int = 0) -> None:
    """Runs ``kernel`` on ``2 * row_tile + 3`` random rows, on its target's device.

    Raises :class:`~tvmgroup.logs.LogError` naming the worst error if any output is off by
    more than a few roundings of the storage dtype relative to the sum of absolute terms.
    """
    spec = kernel.spec
    op, layout = spec.op_def, spec.layout_def
    device = family_of(kernel.target).device_type
    dtype = getattr(torch, spec.dtype)
    rows = 2 * kernel.row_tile + 3
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        args, outs = op.operands(spec, layout, rows, dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    args = [t.to(device) for t in args]
    for i in outs:
        args[i].fill_(float("nan"))
    launch = family_of(kernel.target).launch
    if launch is None:
        kernel(*args)
    else:  # CUDA: on torch's current stream, the one that made the operands and copies them back
        with launch(args[0].device):
            kernel(*args)
    args = [t.cpu() for t in args]
    refs = op.reference_outputs(spec, layout, args)
    mags = op.reference_outputs(spec, layout, [t.abs() for t in args])
    depth = op.depth(spec, rows)
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    for i, ref, mag in zip(outs, refs, mags):
        got = args[i].double()
        bound = 4 * (depth + 1) * eps * mag + 1e-30
        bad = ~((got - ref).abs() <= bound)
        if bad.any():
            worst = (got - ref).abs().nan_to_num(float("inf")).max().item()
            raise LogError(
                f"schedule from {kernel.choice.log or kernel.choice.origin} gives wrong results for {spec.key} "
                f"at {rows} rows: max error {worst:.3e}, allowed about {bound.max().item():.3e}"
            )


def relative_error(kernel: Kernel, tensors: Sequence[torch.Tensor], outs: Sequence[int],
                   refs: Sequence[torch.Tensor]) -> float:
    """Runs ``kernel`` on ``tensors`` with its outputs (indices ``outs``) first filled with NaN,
    and returns the largest error of any output against its float64 reference in ``refs``,
    relative to that reference's largest magnitude: NaN where an output was left unwritten."""
    for i in outs:
        tensors[i].fill_(float("nan"))
    kernel(*tensors)
    errors = [((tensors[i].double() - ref).abs().max() / ref.abs().max()).item() for i, ref in zip(outs, refs)]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)
