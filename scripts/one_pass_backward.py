"""The fused backward's one-pass structures against its default structure, kernel by kernel.

The fused backward (op ``backward``, layout "last") has three loop structures in the CPU
template (``schedules.cpu.STRUCTURES``): ``parts`` (the default: grad_x, then grad_weight and
grad_bias, each reading grad_y), ``one_pass_groups`` and ``one_pass_rows`` (a chunk of
grad_y's rows read once for all three). Each is built with the default's other choices and
``--chunk`` rows a chunk, saved and loaded as the layer loads cached kernels (parallel loops
on the thread pool the layer uses), checked against float64, then timed in interleaved
rounds on reused buffers (median of block medians):

    python scripts/one_pass_backward.py 1024,100,16,16 4096,96,16,16 4096,32,64,64

Prints GFLOP/s (grad_x and grad_weight: 4*N*G*K*O) and the default's time over each
structure's: above 1x the one-pass structure is faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from tvmgroup.bench.shapes import parse_shape
from tvmgroup.bench.timing import median_block_ms
from tvmgroup.choice import ScheduleChoice
from tvmgroup.compute import OpSpec
from tvmgroup.check import relative_error
from tvmgroup.kernel import Kernel, build_kernel, reloaded
from tvmgroup.schedules import DefaultKnobs, structures
from tvmgroup.schedules import cpu
from tvmgroup.target import cpu_target

STRUCTURES = structures("llvm", "backward", "last")


class StructureKnobs(DefaultKnobs):
    """The default's choices in structure ``structure``, with ``chunk`` rows a chunk."""

    def __init__(self, structure: int, chunk: int) -> None:
        self.structure, self.chunk = structure, chunk

    def inner_choice(self, sch, candidates, default):
        return self.chunk if tuple(candidates) == cpu.ONE_PASS_CHUNKS else default


def loaded_kernel(spec: OpSpec, structure: int, chunk: int, workdir: Path) -> Kernel:
    """``spec`` in ``structure``, compiled, saved and loaded as the kernel cache does."""

    def apply(sch) -> None:
        cpu.schedule_cpu(sch, spec.op, spec.layout, spec.bias, StructureKnobs(structure, chunk))

    choice = ScheduleChoice("default", apply, STRUCTURES[structure])
    return reloaded(build_kernel(spec, cpu_target(), choice), workdir)


def checked_call(kernel: Kernel, rows: int) -> Callable[[], object]:
    spec = kernel.spec
    tensors, outs = spec.op_def.operands(spec, spec.layout_def, rows, torch.float32)
    error = relative_error(kernel, tensors, outs, spec.op_def.reference_outputs(spec, spec.layout_def, tensors))
    if not error < 1e-5:
        raise SystemExit(f"{kernel.choice.fingerprint}: relative error {error:.1e} against float64")
    return lambda: kernel(*tensors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", metavar="N,G,K,O")
    parser.add_argument("--chunk", type=int, default=8, choices=cpu.ONE_PASS_CHUNKS,
                        help="rows of grad_y a one-pass structure reads at once (default 8)")
    parser.add_argument("--no-bias", action="store_true", help="without grad_bias")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    shapes = []
    for text in args.shapes:
        try:
            shapes.append(parse_shape(text))
        except ValueError as err:
            parser.error(str(err))
    print(f"{'N,G,K,O':>16}", *(f"{name:>18}" for name in STRUCTURES), " (GFLOP/s; default time / this)")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            spec = OpSpec("backward", shape.groups, shape.in_features, shape.out_features, bias=not args.no_bias)
            kernels = [loaded_kernel(spec, s, args.chunk, Path(tmp)) for s in range(len(STRUCTURES))]
            calls = [checked_call(kernel, shape.n) for kernel in kernels]
            blocks: list[list[float]] = [[] for _ in calls]
            for _ in range(args.rounds):
                for fn, times in zip(calls, blocks):
                    times.append(median_block_ms(fn))
            ms = [statistics.median(times) for times in blocks]
            flops = 4 * shape.n * shape.groups * shape.in_features * shape.out_features
            cells = [f"{flops / t / 1e6:.0f}" + (f" {ms[0] / t:.2f}x" if i else "") for i, t in enumerate(ms)]
            text = f"{shape.n},{shape.groups},{shape.in_features},{shape.out_features}"
            print(f"{text:>16}", *(f"{cell:>18}" for cell in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
