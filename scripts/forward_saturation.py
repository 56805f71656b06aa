"""Where a forward's time goes: the kernel on data in cache, the kernel on data past the
last-level cache, the layer, and the two ceilings, timed in interleaved rounds in one process.

- ``hot``: the kernel the layer serves, called on one reused set of buffers (compute-limited
  where the set fits in cache);
- ``cold``: the same kernel on sets of buffers rotated so that their total exceeds
  ``--working-mb`` (memory-limited where the kernel reads faster than memory delivers);
- ``layer``: ``GroupedLinear`` under ``no_grad`` on rotating inputs (allocation, dispatch);
- ``copy``: ``dst.copy_(src)`` moving as many bytes as one forward reads and writes;
- ``mm2048``: ``torch.mm`` of two 2048 x 2048 matrices, the SGEMM rate.

    python scripts/forward_saturation.py 1024,100,16,16 4096,96,16,16 256,7,200,200

Prints each median (of ``--rounds`` block medians) in ms, GFLOP/s and GB/s (x, W, b and y
counted once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

from tvmgroup import GroupedLinear
from tvmgroup.bench.shapes import parse_shape
from tvmgroup.bench.timing import median_block_ms
from tvmgroup.check import relative_error
from tvmgroup.compute import OpSpec
from tvmgroup.lookup import kernel_for
from tvmgroup.target import cpu_target

def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One call a time, each on the next of ``calls`` (their buffers leave the cache)."""
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]]()

    return call


def shape_calls(n: int, g: int, k: int, o: int, working_bytes: float) -> tuple[dict[str, Callable[[], object]], int]:
    """The timed calls of one shape, and the bytes one forward moves."""
    spec = OpSpec("forward", g, k, o, layout="last")
    kernel = kernel_for(spec, cpu_target())
    moved = 4 * (n * g * k + g * k * o + g * o + n * g * o)
    sets = max(2, int(working_bytes // moved) + 1)
    operands = [spec.op_def.operands(spec, spec.layout_def, n, torch.float32)[0] for _ in range(sets)]
    check, outs = operands[0], spec.op_def.operands(spec, spec.layout_def, n, torch.float32)[1]
    error = relative_error(kernel, check, outs, spec.op_def.reference_outputs(spec, spec.layout_def, check))
    if not error < 1e-5:
        raise SystemExit(f"{n},{g},{k},{o}: the kernel's relative error is {error:.1e}")
    layer = GroupedLinear(g, k, o)
    xs = [torch.randn(n, g * k) for _ in range(sets)]

    def layer_call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    src = torch.randn(moved // 8)  # half the bytes read, half written
    dst = torch.empty_like(src)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    calls = {
        "hot": lambda: kernel(*operands[0]),
        "cold": rotating([lambda t=t: kernel(*t) for t in operands]),
        "layer": rotating([lambda x=x: layer_call(x) for x in xs]),
        "copy": lambda: dst.copy_(src),
        "mm2048": lambda: torch.mm(a, b),
    }
    return calls, moved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", metavar="N,G,K,O")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--working-mb", type=float, default=96.0,
                        help="the least total of the rotated buffers for 'cold' (default 96, past a 32 MB L3)")
    args = parser.parse_args()
    try:
        shapes = [parse_shape(text) for text in args.shapes]
    except ValueError as error:
        parser.error(str(error))
    for text, shape in zip(args.shapes, shapes):
        n, g, k, o = shape.n, shape.groups, shape.in_features, shape.out_features
        calls, moved = shape_calls(n, g, k, o, args.working_mb * 1e6)
        blocks: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(args.rounds):
            for key, fn in calls.items():
                blocks[key].append(median_block_ms(fn))
        ms = {key: statistics.median(v) for key, v in blocks.items()}
        flops = 2 * n * g * k * o
        print(f"{text}: {moved / 1e6:.1f} MB a call; mm2048 {2 * 2048**3 / ms['mm2048'] / 1e6:.0f} GFLOP/s; "
              f"copy of those bytes {moved / ms['copy'] / 1e6:.1f} GB/s")
        for key in ("hot", "cold", "layer"):
            print(f"  {key:>6} {ms[key]:8.3f} ms {flops / ms[key] / 1e6:6.0f} GFLOP/s {moved / ms[key] / 1e6:6.1f} GB/s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
