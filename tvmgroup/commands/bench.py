"""``tvmgroup bench``: times PyTorch's formulations of a grouped linear layer against tvmgroup."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tvmgroup.bench.formulations import BY_LAYOUT, FORMULATIONS
from tvmgroup.bench.inputs import INPUT_LAYOUTS
from tvmgroup.commands.arguments import non_negative, positive
from tvmgroup.bench.shapes import DEFAULT_SHAPES, DEFAULT_SHAPES_BY_DEVICE, GPU_SHAPES, parse_shape

DTYPES = ("float32", "bfloat16", "float16")

FULL = {"warmup": 3, "repeats": 20, "rounds": 4, "buffers": 4, "sgemm_size": 2048, "ceiling_repeats": 5}
# A GPU reaches its GEMM rate only on larger matrices than a CPU (2048^2 leaves an H100 half idle).
GPU_GEMM_SIZE = 8192
QUICK = {"warmup": 1, "repeats": 5, "rounds": 2, "buffers": 2, "sgemm_size": 2048, "ceiling_repeats": 3}

DESCRIPTION = """\
Times the forward pass (without autograd) and the forward+backward pass (gradients of x,
weight and bias) of every formulation of y[n,g,:] = x[n,g,:] @ W[g]^T + b[g], float32 on the
CPU (--device, --dtype choose), at each shape N,G,K,O (N rows, G groups, K -> O features per
group).

Before timing, each formulation's output and gradients are compared with a float64 reference
(computed on the same device from the same rounded inputs); one that differs (relative error
> 1e-4 in float32, > 4 unit roundoffs in bfloat16 / float16: 1.6e-2 / 2.0e-3) is reported
WRONG and not timed, one that cannot run (e.g. torch.compile without a working compiler) is
reported FAILED, and the run goes on.
Compilation (torch.compile, tvmgroup's first call of a shape) happens during that check and is
not timed. Each timing is the median over --repeats calls, spread over --rounds interleaved
rounds (each round times every formulation of the shape in turn, after --warmup untimed calls
in the first round and one in each later round), so that a machine whose speed drifts slows
every formulation alike; every
call takes the next of several freshly random input buffers, drawn contiguous in the
formulation's own input layout (untimed). --layout picks the layout and its formulations:
last, x (N, G*K) -> (N, G*O), with conv1d on its natural (1, G*K, N) beside them (N as the
length axis); conv, (1, G*K, N); ensemble, (G, N, K) -> (G, N, O), weights stored (G, K, O)
and biases (G, 1, O) as ensembles keep them; shared, one input (N, K) read by every group ->
(G, N, O); shared_last, the same input -> (N, G*O), against one nn.Linear of the stacked
weight. Gradients are compared in one convention, (G, O, K) and (G, O). block-diag
prebuilds its dense weight for the forward timing and builds it from the (G, O, K) weight on
every fwd+bwd call, so its weight gradient stays block-diagonal.

The run also measures this machine's ceilings: SGEMM rate (a square float32 torch.mm; on a
GPU, torch.mm in the run's dtype) and memory bandwidth (a 256 MB copy_, read + write, on the
run's device). Per shape the report gives the compute floor
(FLOPs / SGEMM rate) and the memory floor (bytes of x, y, W, b -- and for fwd+bwd grad_y,
grad_x, grad_W, grad_b -- moved once / bandwidth); "% floor" is the larger floor over the
measured time. FLOPs: forward 2*N*G*K*O, forward+backward 3x that.

--device cuda times with CUDA events on torch's current stream (recorded around each call,
then synchronised), adds torch.compile(mode="max-autotune") of bmm and
torch.nn.functional.grouped_mm (skipped with the reason where torch lacks it), runs float32
without TF32 (so float32 means float32, for cuBLAS and cuDNN alike), and adds shapes that fill
a GPU to the defaults. Several --dtype values run one after another into DIR/<dtype>/.
"""

_NAME_WIDTH = max(len(name) for name in FORMULATIONS)
EPILOG = "formulations:\n" + "\n".join(
    f"  {f.name:<{_NAME_WIDTH}}  {f.description}" for f in FORMULATIONS.values()
) + f"""

shapes are N,G,K,O in every layout (ensemble, shared, shared_last: N the batch, G the members).
default shapes (N,G,K,O): {'  '.join(s.short for s in DEFAULT_SHAPES)}
with --device cuda also: {'  '.join(s.short for s in GPU_SHAPES)}

outputs in --output DIR: bench.txt (the table, also printed), bench.md (the same as Markdown
tables, for docs/performance.md), bench.json (every sample, the
floors, machine info: CPU model, cores, torch/tvm versions, command line), bench.png (chart of
tvmgroup's speedup over each formulation; not with --no-chart).

exit status: 0, or 1 if a formulation computed a wrong result, 2 on a usage error.
"""


def _shape_arg(text: str):
    try:
        return parse_shape(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time PyTorch formulations of a grouped linear layer against tvmgroup",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", type=_shape_arg, action="append", metavar="N,G,K,O",
                   help="a shape to time (repeatable); replaces the default shapes")
    p.add_argument("--quick", action="store_true",
                   help=f"short run: {QUICK['repeats']} repeats in {QUICK['rounds']} rounds after "
                        f"{QUICK['warmup']} warm-up call, {QUICK['buffers']} input buffers (default "
                        f"{FULL['repeats']} repeats in {FULL['rounds']} rounds, {FULL['warmup']} warm-up "
                        f"calls, {FULL['buffers']} buffers); same shapes")
    p.add_argument("--repeats", type=positive, help="timed calls per measurement (overrides --quick)")
    p.add_argument("--rounds", type=positive,
                   help="interleaved rounds the repeats are spread over (overrides --quick; 1: each "
                        "formulation timed in one stretch)")
    p.add_argument("--warmup", type=non_negative, help="untimed calls before timing (overrides --quick)")
    p.add_argument("--formulations", metavar="NAME[,NAME...]",
                   help="only these formulations (default: those of --layout; all: "
                        f"{','.join(FORMULATIONS)})")
    p.add_argument("--layout", choices=tuple(BY_LAYOUT), default="last",
                   help="the input layout and its formulations: "
                        + "; ".join(f"{name}, {INPUT_LAYOUTS[name].summary}: {', '.join(names)}"
                                    for name, names in BY_LAYOUT.items())
                        + " (default last; nn.Conv1d runs on its own layout beside the last run's)")
    p.add_argument("--compare-default", action="store_true",
                   help="also time each tvmgroup formulation on its default schedules (name suffix "
                        "-default), whatever tuning logs serve it, and report tuned over default")
    p.add_argument("--threads", type=positive, default=os.cpu_count() or 1,
                   help="threads for PyTorch and TVM (default: os.cpu_count() = %(default)s)")
    p.add_argument("--output", type=Path, default=Path("bench-results"), metavar="DIR",
                   help="directory for bench.txt, bench.md, bench.json, bench.png (default: %(default)s/)")
    p.add_argument("--no-chart", action="store_true", help="do not draw bench.png")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default cpu; cuda: the current CUDA GPU, timed with CUDA events)")
    p.add_argument("--dtype", choices=DTYPES, action="append", metavar="DTYPE",
                   help=f"dtype of inputs, weights and outputs (repeatable; {', '.join(DTYPES)}; default float32); "
                        "several run one after another, each into DIR/<dtype>/")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--models", action="store_true",
                   help="time small model stacks instead of single layers: grouped K->H, GELU, LayerNorm, "
                        "grouped H->K, forward and forward+backward (formulations that take (N, G*K) only); "
                        "writes models.txt and models.json")
    p.add_argument("--model-shape", type=_model_shape_arg, action="append", metavar="N,G,K,H",
                   help="a stack to time with --models (repeatable); replaces the default stacks")
    p.set_defaults(run=run)


def _model_shape_arg(text: str):
    from tvmgroup.bench.models import parse_model_shape

    try:
        return parse_model_shape(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from tvmgroup.bench import formulations as registry
    from tvmgroup.bench.machine import machine_info
    from tvmgroup.bench.runner import Settings
    from tvmgroup.bench.timing import timer_for

    models = bool(args.models or args.model_shape)
    dtypes = list(dict.fromkeys(args.dtype or ["float32"]))
    if models and args.device == "cuda":
        raise ValueError("--models runs on the CPU only; drop --device cuda")
    if models and dtypes != ["float32"]:
        raise ValueError("--models times float32 only; drop --dtype")
    if models and args.compare_default:
        raise ValueError("--compare-default times single layers; drop --models (or run the stacks with and "
                         "without the logs: TVMGROUP_HOME names the user's logs)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch.cuda.is_available() is False (no CUDA GPU, or a torch "
                           f"without CUDA: torch {torch.__version__}); use --device cpu")
    timer = timer_for(args.device)
    chosen = registry.select(args.formulations, args.layout, args.device)
    if args.compare_default:
        chosen = registry.with_defaults(chosen)
    shapes = list(args.shape or DEFAULT_SHAPES_BY_DEVICE[args.device])
    preset = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    if args.device == "cuda":
        # float32 means float32: no TF32 in cuBLAS (off by default) nor in cuDNN (on by default).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.output.mkdir(parents=True, exist_ok=True)

    info = machine_info(args.threads, args.device)
    if models:
        settings = Settings(warmup=preset["warmup"] if args.warmup is None else args.warmup,
                            repeats=args.repeats or preset["repeats"], buffers=preset["buffers"], seed=args.seed,
                            rounds=args.rounds or preset["rounds"])
        return _run_models(args, chosen, settings, timer, info)
    status = 0
    for dtype in dtypes:
        settings = Settings(
            warmup=preset["warmup"] if args.warmup is None else args.warmup,
            repeats=args.repeats or preset["repeats"],
            buffers=preset["buffers"],
            seed=args.seed,
            device=args.device,
            dtype=getattr(torch, dtype),
            rounds=args.rounds or preset["rounds"],
        )
        output = args.output if len(dtypes) == 1 else args.output / dtype
        status = max(status, _run_layers(args, chosen, shapes, settings, preset, timer, info, output))
    return status


def _run_layers(args, chosen, shapes, settings, preset, timer, info, output: Path) -> int:
    """The single-layer run in one dtype: ceilings, every shape, the report files in ``output``."""
    from tqdm import tqdm

    from tvmgroup.bench.machine import measure_ceilings
    from tvmgroup.bench.report import format_markdown, format_report, to_json, write_chart, write_json
    from tvmgroup.bench.runner import run_shape

    output.mkdir(parents=True, exist_ok=True)
    dtype_name = str(settings.dtype).removeprefix("torch.")
    options = {
        "shapes": [s.short for s in shapes], "formulations": [f.name for f in chosen],
        "quick": args.quick, "warmup": settings.warmup, "repeats": settings.repeats, "rounds": settings.rounds,
        "buffers": settings.buffers, "threads": args.threads, "seed": args.seed, "layout": args.layout,
        "device": settings.device, "dtype": dtype_name,
    }
    with tqdm(total=1 + len(shapes) * len(chosen), desc=f"bench {dtype_name}", unit="step", file=sys.stderr,
              dynamic_ncols=True, mininterval=1.0) as bar:
        bar.set_postfix_str("measuring ceilings")
        gemm_size = preset["sgemm_size"] if settings.device == "cpu" else GPU_GEMM_SIZE
        ceilings = measure_ceilings(gemm_size, 256, preset["ceiling_repeats"],
                                    device=settings.device, dtype=settings.dtype, timer=timer)
        bar.update()
        shape_results = []
        for shape in shapes:
            def start(name: str, shape=shape) -> None:
                bar.set_postfix_str(f"{shape.short} {name}")

            def done(result, shape=shape) -> None:
                if result.status in ("wrong", "failed"):
                    bar.write(f"{shape.label} {result.name}: {result.status.upper()}: {result.message}")
                bar.update()

            shape_results.append(run_shape(shape, chosen, settings, timer, on_start=start, on_done=done,
                                           layout=args.layout))

    text = format_report(shape_results, ceilings, info, args.layout)
    print(text, end="")
    (output / "bench.txt").write_text(text)
    write_json(output / "bench.json", to_json(shape_results, ceilings, info, options))
    (output / "bench.md").write_text(format_markdown(shape_results, ceilings, info, args.layout))
    written = ["bench.txt", "bench.md", "bench.json"]
    if not args.no_chart and write_chart(output / "bench.png", shape_results):
        written.append("bench.png")
    print(f"\nwrote {', '.join(str(output / name) for name in written)}")
    wrong = [(s.shape.short, r.name) for s in shape_results for r in s.results if r.status == "wrong"]
    return 1 if wrong else 0


def _run_models(args, chosen, settings, timer, info) -> int:
    """``--models``: the stacks of :mod:`tvmgroup.bench.models`, one table each."""
    import json
    import sys

    from tqdm import tqdm

    from tvmgroup.bench.models import DEFAULT_MODELS, format_models, models_to_json, run_model

    if args.shape:
        raise ValueError("--shape times single layers; with --models give stacks as --model-shape N,G,K,H")
    formulations = [f for f in chosen if f.layout == "last"]
    if args.formulations and len(formulations) != len(chosen):
        left_out = ", ".join(f.name for f in chosen if f.layout != "last")
        raise ValueError(f"--models: {left_out} take another input layout and cannot run in a stack")
    shapes = list(args.model_shape or DEFAULT_MODELS)
    results = []
    with tqdm(total=len(shapes) * len(formulations), desc="bench --models", unit="stack", file=sys.stderr,
              dynamic_ncols=True, mininterval=1.0) as bar:
        for shape in shapes:
            def done(result, shape=shape) -> None:
                if result.status in ("wrong", "failed"):
                    bar.write(f"stack {shape.label} {result.name}: {result.status.upper()}: {result.message}")
                bar.update()

            results.append(run_model(shape, formulations, settings, timer, on_done=done))
    head = (f"{info['cpu_model']}, {info['cpu_count']} cores, {info['threads']} threads; torch {info['torch']}, "
            f"tvm {info['tvm']}; float32, median of timed calls; GFLOP/s counts the two grouped layers\n\n")
    text = head + format_models(results)
    print(text, end="")
    (args.output / "models.txt").write_text(text)
    data = {"machine": info, "options": {"models": [s.short for s in shapes], "warmup": settings.warmup,
                                         "repeats": settings.repeats, "rounds": settings.rounds,
                                         "threads": args.threads, "seed": args.seed,
                                         "formulations": [f.name for f in formulations]},
            "models": models_to_json(results)}
    (args.output / "models.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {args.output / 'models.txt'}, {args.output / 'models.json'}")
    return 1 if any(r.status == "wrong" for m in results for r in m.results) else 0
