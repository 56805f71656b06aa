"""The benchmark's outputs: a text table, a JSON file of every raw number, a PNG chart.

Per shape the table shows each formulation's median times, its GFLOP/s and how close it gets
to the shape's floor: the larger of the compute floor (FLOPs / measured SGEMM rate) and the
memory floor (bytes / measured copy bandwidth). ``% floor`` = floor / time, 100% = at the floor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tvmgroup.bench.inputs import input_layout
from tvmgroup.bench.machine import Ceilings
from tvmgroup.bench.runner import Result, ShapeResult
from tvmgroup.bench.shapes import Shape


def element_size(ceilings: Ceilings) -> int:
    """Bytes per element of the run's dtype (the dtype the GEMM ceiling was measured in)."""
    import torch

    return torch.empty((), dtype=getattr(torch, ceilings.gemm_dtype)).element_size()


def _gemm_name(ceilings: Ceilings) -> str:
    if ceilings.device == "cpu" and ceilings.gemm_dtype == "float32":
        return "SGEMM"
    return f"GEMM {ceilings.gemm_dtype}"


def _machine_text(info: dict) -> str:
    cpu = f"{info['cpu_model']}, {info['cpu_count']} cores, {info['threads']} threads"
    if info.get("gpu_name"):
        return f"{info['gpu_name']} (sm {info['gpu_capability']}, CUDA {info['cuda']}) on {cpu}"
    return cpu


def _bytes(shape: Shape, ceilings: Ceilings, backward: bool, layout: str) -> int:
    return shape.bytes_moved(backward, element_size(ceilings), input_layout(layout).x_elements(shape))


def floors_ms(shape: Shape, ceilings: Ceilings, backward: bool, layout: str = "last") -> dict[str, float]:
    """Compute and memory floors in milliseconds (the time no implementation can beat); the
    memory floor counts x in ``layout`` (one input for every group reads N*K elements)."""
    compute = shape.flops(backward) / (ceilings.sgemm_gflops * 1e9) * 1e3
    memory = _bytes(shape, ceilings, backward, layout) / (ceilings.copy_gbs * 1e9) * 1e3
    return {"compute_ms": compute, "memory_ms": memory, "floor_ms": max(compute, memory)}


def _cell(result: Result, backward: bool, shape: Shape, floor_ms: float) -> list[str]:
    timing = result.forward_backward if backward else result.forward
    if timing is None:
        return ["-", "-", "-"]
    gflops = shape.flops(backward) / (timing.median_ms * 1e6)
    return [f"{timing.median_ms:.3f}", f"{gflops:.1f}", f"{100 * floor_ms / timing.median_ms:.0f}%"]


def _speedup_text(shape_result: ShapeResult, backward: bool) -> str:
    speedup = shape_result.speedup(backward)
    if speedup is None:
        return "n/a"
    value, name = speedup
    return f"{value:.2f}x (vs {name})"


def _tuned_text(shape_result: ShapeResult) -> str | None:
    """``--compare-default``: the tuned layer against its default schedules, or None."""
    fwd, bwd = shape_result.tuned_over_default(False), shape_result.tuned_over_default(True)
    if fwd is None and bwd is None:
        return None
    text = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    return f"tvmgroup as looked up (tuning logs) over its default schedules: fwd {text(fwd)}, fwd+bwd {text(bwd)}"


def _layout_text(layout: str) -> str:
    return f"layout {layout}: {input_layout(layout).summary}"


def format_shape(shape_result: ShapeResult, ceilings: Ceilings) -> str:
    shape, layout = shape_result.shape, shape_result.layout
    fwd, bwd = floors_ms(shape, ceilings, False, layout), floors_ms(shape, ceilings, True, layout)
    lines = [
        f"{shape.label}: fwd {shape.flops(False) / 1e9:.3f} GFLOP, {_bytes(shape, ceilings, False, layout) / 1e6:.1f} MB; "
        f"fwd+bwd {shape.flops(True) / 1e9:.3f} GFLOP, {_bytes(shape, ceilings, True, layout) / 1e6:.1f} MB",
        f"  floors fwd: compute {fwd['compute_ms']:.3f} ms, memory {fwd['memory_ms']:.3f} ms; "
        f"fwd+bwd: compute {bwd['compute_ms']:.3f} ms, memory {bwd['memory_ms']:.3f} ms",
    ]
    header = ["formulation", "fwd ms", "GFLOP/s", "% floor", "fwd+bwd ms", "GFLOP/s", "% floor", "note"]
    rows = []
    for r in shape_result.results:
        note = r.message if r.status != "ok" or r.is_tvmgroup else ""
        if r.status != "ok":
            note = f"{r.status.upper()}: {note}"
        rows.append([r.name, *_cell(r, False, shape, fwd["floor_ms"]), *_cell(r, True, shape, bwd["floor_ms"]), note])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:])]
        lines.append(("  " + "  ".join(cells) + ("  " + row[-1] if row[-1] else "")).rstrip())
    lines.append(
        f"  tvmgroup speedup over the best PyTorch formulation: fwd {_speedup_text(shape_result, False)}, "
        f"fwd+bwd {_speedup_text(shape_result, True)}"
    )
    tuned = _tuned_text(shape_result)
    if tuned:
        lines.append(f"  {tuned}")
    return "\n".join(lines)


def format_report(shape_results: list[ShapeResult], ceilings: Ceilings, info: dict, layout: str = "last") -> str:
    head = [
        f"{_machine_text(info)}; "
        f"torch {info['torch']}, tvm {info['tvm']}; {ceilings.gemm_dtype}, median of timed calls",
        _layout_text(layout),
        f"measured ceilings: {_gemm_name(ceilings)} {ceilings.sgemm_gflops:.1f} GFLOP/s "
        f"(torch.mm {ceilings.sgemm_size}^2), "
        f"memory {ceilings.copy_gbs:.1f} GB/s (copy_ of {ceilings.copy_mbytes} MB, read + write)",
    ]
    return "\n\n".join(["\n".join(head), *(format_shape(s, ceilings) for s in shape_results)]) + "\n"


def format_markdown(shape_results: list[ShapeResult], ceilings: Ceilings, info: dict, layout: str = "last") -> str:
    """The same numbers as :func:`format_report`, as Markdown tables (for docs/performance.md)."""
    lines = [
        f"{_machine_text(info)}; torch {info['torch']}, "
        f"tvm {info['tvm']}; {ceilings.gemm_dtype}; `{info['command']}` at {info['utc']}.",
        "",
        f"Layout {layout}: {input_layout(layout).summary}.",
        "",
        f"Measured ceilings: {_gemm_name(ceilings)} {ceilings.sgemm_gflops:.1f} GFLOP/s "
        f"(`torch.mm` {ceilings.sgemm_size}^2), "
        f"memory {ceilings.copy_gbs:.1f} GB/s (`copy_` of {ceilings.copy_mbytes} MB, read + write).",
    ]
    for s in shape_results:
        shape = s.shape
        fwd, bwd = floors_ms(shape, ceilings, False, s.layout), floors_ms(shape, ceilings, True, s.layout)
        lines += [
            "",
            f"**{shape.label}**: floors fwd {fwd['compute_ms']:.3f} ms compute / {fwd['memory_ms']:.3f} ms memory; "
            f"fwd+bwd {bwd['compute_ms']:.3f} ms compute / {bwd['memory_ms']:.3f} ms memory.",
            "",
            "| formulation | fwd ms | GFLOP/s | % floor | fwd+bwd ms | GFLOP/s | % floor | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in s.results:
            name = f"**{r.name}**" if r.is_tvmgroup else r.name
            note = r.message if r.status == "ok" else f"{r.status.upper()}: {r.message}".replace("|", "/")
            cells = [*_cell(r, False, shape, fwd["floor_ms"]), *_cell(r, True, shape, bwd["floor_ms"])]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {note} |")
        lines += ["", f"tvmgroup speedup over the best PyTorch formulation: fwd {_speedup_text(s, False)}, "
                      f"fwd+bwd {_speedup_text(s, True)}."]
        tuned = _tuned_text(s)
        if tuned:
            lines += ["", f"{tuned}."]
    return "\n".join(lines) + "\n"


def to_json(shape_results: list[ShapeResult], ceilings: Ceilings, info: dict, options: dict) -> dict:
    shapes = []
    for s in shape_results:
        entry = {
            "shape": s.shape.to_dict(),
            "flops": {"forward": s.shape.flops(False), "forward_backward": s.shape.flops(True)},
            "layout": s.layout,
            "bytes": {"forward": _bytes(s.shape, ceilings, False, s.layout),
                      "forward_backward": _bytes(s.shape, ceilings, True, s.layout)},
            "floors": {"forward": floors_ms(s.shape, ceilings, False, s.layout),
                       "forward_backward": floors_ms(s.shape, ceilings, True, s.layout)},
            "results": [r.to_dict() for r in s.results],
        }
        for key, backward in (("forward", False), ("forward_backward", True)):
            speedup = s.speedup(backward)
            entry.setdefault("tvmgroup_speedup", {})[key] = (
                {"speedup": speedup[0], "best_pytorch": speedup[1]} if speedup else None
            )
            tuned = s.tuned_over_default(backward)
            if tuned is not None:
                entry.setdefault("tuned_over_default", {})[key] = tuned
        shapes.append(entry)
    return {"machine": info, "options": options, "ceilings": ceilings.to_dict(), "shapes": shapes}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_chart(path: Path, shape_results: list[ShapeResult]) -> bool:
    """Bars of tvmgroup's speedup over each PyTorch formulation, fwd and fwd+bwd side by side.

    Returns False (and writes nothing) when there is no tvmgroup timing to compare with, or
    without matplotlib (a GPU machine may lack it: the numbers are in the other files).
    """
    try:
        import matplotlib
    except ImportError:
        print("bench: matplotlib is not installed; no chart", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for s in shape_results:
        for r in s.results:
            if not r.is_tvmgroup and r.name not in names:
                names.append(r.name)
    if not names or not any(s.tvmgroup() and s.tvmgroup().forward for s in shape_results):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(shape_results) + 4), 4.8), sharey=True)
    width = 0.8 / len(names)
    for ax, backward, title in ((axes[0], False, "forward"), (axes[1], True, "forward + backward")):
        for j, name in enumerate(names):
            values = []
            for s in shape_results:
                ours = s.tvmgroup()
                other = next((r for r in s.results if r.name == name), None)
                ours_t = ours and (ours.forward_backward if backward else ours.forward)
                other_t = other and (other.forward_backward if backward else other.forward)
                values.append(other_t.median_ms / ours_t.median_ms if ours_t and other_t else float("nan"))
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(shape_results))]
            ax.bar(xs, values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shape_results)))
        ax.set_xticklabels([s.shape.label.replace(" ", "\n") for s in shape_results], fontsize=8)
        ax.set_title(f"{title}: tvmgroup speedup (>1 = tvmgroup faster)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("formulation time / tvmgroup time")
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
