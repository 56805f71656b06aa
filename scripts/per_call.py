"""Per-call cost of a tiny grouped layer against einsum + bias, forward and forward+backward.

At such shapes the kernels take under a microsecond and what is timed is the Python and
autograd work around them: the cost every layer of a small-batch model pays on each call.

    python scripts/per_call.py [--rows 8 --groups 4 --in-features 8 --out-features 8]

Prints the median of 7 blocks of calls after 300 warm-up calls, per call in microseconds.
"""

from __future__ import annotations

import argparse
import math
import warnings
from typing import Callable

import torch

import tvmgroup
from tvmgroup.bench.timing import time_calls


def per_call_us(fn: Callable[[], object], calls: int, blocks: int = 7, warmup: int = 300) -> float:
    """Median over ``blocks`` blocks of ``calls`` calls (a call is too short to time alone),
    after at least ``warmup`` untimed calls, in microseconds per call."""

    def block(_: int) -> None:
        for _ in range(calls):
            fn()

    return time_calls(block, warmup=math.ceil(warmup / calls), repeats=blocks).median_ms * 1e3 / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--in-features", type=int, default=8)
    p.add_argument("--out-features", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, g, k, o = args.rows, args.groups, args.in_features, args.out_features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tvmgroup.UntunedShapeWarning)
        layer = tvmgroup.GroupedLinear(g, k, o)
        layer(torch.randn(n, g * k, requires_grad=True)).sum().backward()  # builds the kernels
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x = torch.randn(n, g * k)
    x_leaf = x.clone().requires_grad_(True)
    grad_y = torch.randn(n, g * o)

    def einsum(inp: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("ngk,gok->ngo", inp.view(n, g, k), weight) + bias).reshape(n, g * o)

    def forward(fn: Callable) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                fn(x)
        return run

    def forward_backward(fn: Callable, params: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        def run() -> None:
            for t in (x_leaf, *params):
                t.grad = None
            fn(x_leaf).backward(grad_y)
        return run

    print(f"x {tuple(x.shape)}, {g} groups {k} -> {o}, {args.threads} threads; us per call (median)")
    print(f"forward:          tvmgroup {per_call_us(forward(layer), 2000):6.1f}   "
          f"einsum + bias {per_call_us(forward(einsum), 2000):6.1f}")
    print(f"forward+backward: tvmgroup {per_call_us(forward_backward(layer, tuple(layer.parameters())), 500):6.1f}   "
          f"einsum + bias {per_call_us(forward_backward(einsum, (weight, bias)), 500):6.1f}")


if __name__ == "__main__":
    main()
