"""Forward+backward of GroupedLinear with the fused backward against grad_input + grad_weight.

The fused backward (op ``backward``) computes grad_x, grad_weight and grad_bias in one kernel
call; ``tvmgroup.ops.FUSED_BACKWARD = False`` makes the same layer run the two kernels. The
two variants alternate block by block, so load on the machine hits both alike. Both run
the default (untuned) schedules.

    python scripts/fused_backward.py [--threads 2]

Prints per shape the median over blocks, in microseconds per forward+backward step, and the
ratio fused / separate; below 1 the fused backward is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch

import tvmgroup
from tvmgroup import ops

# (rows, groups, in_features, out_features, calls per block)
SHAPES = [(8, 4, 8, 8, 2000), (1024, 100, 16, 16, 20), (4096, 32, 64, 64, 10), (256, 10, 256, 256, 20)]


def step_fn(rows: int, groups: int, k: int, o: int) -> Callable[[], None]:
    layer = tvmgroup.GroupedLinear(groups, k, o)
    x = torch.randn(rows, groups * k, requires_grad=True)
    grad_y = torch.randn(rows, groups * o)

    def step() -> None:
        layer(x).backward(grad_y)

    return step


def block_us(fn: Callable[[], None], calls: int, fused: bool) -> float:
    ops.FUSED_BACKWARD = fused
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.blocks} blocks per variant")
    print(f"{'rows x G x K x O':>22} {'fused us':>10} {'separate us':>12} {'fused/separate':>15}")
    for rows, groups, k, o, calls in SHAPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tvmgroup.UntunedShapeWarning)
            step = step_fn(rows, groups, k, o)
            for fused in (True, False):  # builds (or loads) the kernels, then warms up
                for _ in range(3):
                    block_us(step, calls, fused)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.blocks):
            for fused in (True, False):
                times[fused].append(block_us(step, calls, fused))
        fused_us, separate_us = statistics.median(times[True]), statistics.median(times[False])
        shape = f"{rows} x {groups} x {k} x {o}"
        print(f"{shape:>22} {fused_us:10.1f} {separate_us:12.1f} {fused_us / separate_us:15.3f}", flush=True)
    ops.FUSED_BACKWARD = True


if __name__ == "__main__":
    main()
