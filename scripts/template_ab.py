"""A/B of the CPU schedule template: a git revision's ``schedules/cpu.py`` against this checkout's.

Both templates' default schedules are compiled for each shape's forward and fused backward
(layout ``--layout``), saved and loaded as the layer loads cached kernels (parallel loops on
torch's OpenMP threads), checked against float64, then timed in interleaved blocks of calls on
reused buffers (median block over ``--rounds`` rounds), beside ``torch.bmm`` on pre-transposed
``(G, N, K)`` operands for scale. Run from the repository root:

    python scripts/template_ab.py --against HEAD~1 4096,32,64,64 256,10,256,256
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from tvmgroup.bench.timing import median_block_ms
from tvmgroup.check import relative_error
from tvmgroup.choice import ScheduleChoice
from tvmgroup.compute import OpSpec
from tvmgroup.kernel import Kernel, build_kernel, reloaded
from tvmgroup.schedules import DefaultKnobs
from tvmgroup.target import cpu_target


def template_at(revision: str, workdir: Path) -> ModuleType:
    """``schedules/cpu.py`` as it was at ``revision``, imported beside the installed package."""
    source = subprocess.run(["git", "show", f"{revision}:schedules/cpu.py"], capture_output=True, text=True,
                            check=True).stdout
    source = source.replace("from .knobs import", "from tvmgroup.schedules.knobs import")
    source = source.replace("from .roles import", "from tvmgroup.schedules.roles import")
    path = workdir / "cpu_template_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("cpu_template_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def loaded_kernel(spec: OpSpec, template: ModuleType, workdir: Path, name: str) -> Kernel:
    """``spec`` compiled with ``template``'s default, saved and loaded as the kernel cache does."""

    def apply(sch) -> None:
        template.schedule_cpu(sch, spec.op, spec.layout, spec.bias, DefaultKnobs())

    return reloaded(build_kernel(spec, cpu_target(), ScheduleChoice("default", apply, name)), workdir)


def _rate(flops: int, ms: float) -> str:
    return f"{flops / ms / 1e6:6.0f} GFLOP/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", metavar="N,G,K,O")
    parser.add_argument("--against", default="HEAD~1", help="the git revision to compare with (default HEAD~1)")
    parser.add_argument("--layout", default="last", help="kernel layout (default last)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import tvmgroup.schedules.cpu as current

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        templates = {"before": template_at(args.against, workdir), "after": current}
        print(f"{'N,G,K,O':>16} {'op':>9} {'before':>14} {'after':>14} {'after/before':>12} {'bmm (fwd)':>14}")
        for text in args.shapes:
            n, g, k, o = (int(v) for v in text.split(","))
            calls: dict[str, Callable[[], object]] = {}
            for op in ("forward", "backward"):
                spec = OpSpec(op, g, k, o, layout=args.layout)
                tensors, outs = spec.op_def.operands(spec, spec.layout_def, n, torch.float32)
                ref = spec.op_def.reference_outputs(spec, spec.layout_def, tensors)
                for name, template in templates.items():
                    kernel = loaded_kernel(spec, template, workdir, name)
                    error = relative_error(kernel, tensors, outs, ref)
                    if not error < 1e-5:
                        raise SystemExit(f"{text} {op} {name}: relative error {error:.1e}")
                    calls[f"{op}-{name}"] = lambda kernel=kernel, tensors=tensors: kernel(*tensors)
            x, w = torch.randn(g, n, k), torch.randn(g, k, o)
            calls["bmm"] = lambda: torch.bmm(x, w)
            blocks = {key: [] for key in calls}
            for _ in range(args.rounds):
                for key, fn in calls.items():
                    blocks[key].append(median_block_ms(fn))
            ms = {key: statistics.median(v) for key, v in blocks.items()}
            flops = 2 * n * g * k * o
            for op, factor in (("forward", 1), ("backward", 2)):  # the backward: grad_x and grad_W
                before, after = ms[f"{op}-before"], ms[f"{op}-after"]
                bmm = _rate(flops, ms["bmm"]) if op == "forward" else ""
                print(f"{text:>16} {op:>9} {_rate(flops * factor, before):>14} {_rate(flops * factor, after):>14} "
                      f"{before / after:11.2f}x {bmm:>14}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
