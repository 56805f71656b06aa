"""``tvmgroup tune``: tunes the grouped linear ops for one shape with MetaSchedule."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from tvmgroup.commands.arguments import positive
from tvmgroup.compute import LAYOUTS, OPS
from tvmgroup.weights import WEIGHT_LAYOUTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="tune the ops of one shape with MetaSchedule and save the log",
        description="Tunes forward/grad_input/grad_weight/backward (the fused backward) for one shape (--groups, --in-features, "
        "--out-features), or every op shape of a model (--model). Running the same command again "
        "resumes: only the trials missing from the logs are measured. With --rpc-tracker, candidates "
        "are built here and measured on the RPC servers registered under --rpc-key.",
    )
    p.add_argument("--groups", type=positive)
    p.add_argument("--in-features", type=positive)
    p.add_argument("--out-features", type=positive)
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="tune every op shape of a model: a function returning (model, example_inputs); "
                        "MODULE is importable or a .py file. Rows are those the layers see")
    p.add_argument("--inference", action="store_true", help="with --model: only the forward ops")
    p.add_argument("--rows", type=positive, default=4096,
                   help="rows (batch*length) to tune at; rounded up to the target's row multiple (default 4096)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage dtype (default float32); the target must run it (CPU: float32)")
    p.add_argument("--layout", choices=LAYOUTS, default="last")
    p.add_argument("--weight-layout", choices=tuple(WEIGHT_LAYOUTS), default="out_in",
                   help="how the weight is stored: out_in (G, O, K) or in_out (G, K, O) (default out_in)")
    p.add_argument("--no-bias", dest="bias", action="store_false", help="the layer has no bias")
    p.add_argument("--ops", default=None,
                   help=f"comma-separated ops among {','.join(OPS)} (default: every op the target's template "
                        "schedules on the layout; CUDA has no fused backward)")
    p.add_argument("--target", default=None,
                   help="'llvm' (this CPU, the default), 'cuda' (this GPU), 'cuda:sm_XX', or a target as JSON "
                        "(the remote device's, with --rpc-tracker: '{\"kind\": \"llvm\", \"mcpu\": \"skylake-avx512\", "
                        "\"num-cores\": 8}'); logs are filed under its key")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", type=_host_port,
                   help="measure on the servers of this RPC tracker (python -m tvm.exec.rpc_tracker)")
    p.add_argument("--rpc-key", metavar="KEY", help="the key the servers registered under (with --rpc-tracker)")
    p.add_argument("--trials", type=positive, default=64, help="trials per op (default 64)")
    p.add_argument("--space", choices=("template", "generic"), default="template",
                   help="the tvmgroup template (default) or MetaSchedule's generic space, for comparison")
    p.add_argument("--output", type=Path, default=None,
                   help="log root (default $TVMGROUP_HOME/tuning_logs); --output tuning_logs makes shipped logs")
    p.add_argument("--keep", type=positive, default=None,
                   help="prune each log to its N best records at the end (default: 8 with --output, else all)")
    p.add_argument("--batch", type=positive, default=16, help="candidates measured per search iteration (default 16)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


DTYPES = ("float32", "float16", "bfloat16")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:9190), got {text!r}")
    return host, int(port)


def _target(text: str | None):
    import json

    from tvmgroup.target import parse_target

    if text is None:
        return parse_target("llvm")
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as err:
            raise ValueError(f"--target: not valid JSON ({err}): {text!r}") from None
        if not isinstance(value, dict) or "kind" not in value:
            raise ValueError(f"--target JSON must be an object with a \"kind\", got {text!r}")
        try:
            return parse_target(value)
        except Exception as err:  # TVM rejects the attributes
            raise ValueError(f"--target {text}: {err}") from None
    return parse_target(text)


def _rpc(args: argparse.Namespace):
    if (args.rpc_tracker is None) != (args.rpc_key is None):
        raise ValueError("--rpc-tracker and --rpc-key go together")
    if args.rpc_tracker is None:
        return None
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    from tvmgroup.tuning.tune import RPC_SESSION_TIMEOUT_S

    host, port = args.rpc_tracker
    return RPCConfig(tracker_host=host, tracker_port=port, tracker_key=args.rpc_key,
                     session_timeout_sec=RPC_SESSION_TIMEOUT_S)


def _ops(text: str | None, family, layout: str) -> list[str]:
    """The ops to tune: ``--ops``, or every op ``family``'s template schedules on ``layout``."""
    if text is None:
        return [op for op in OPS if family.supports(op, layout)]
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"--ops must be a comma-separated subset of {','.join(OPS)}, got {text!r}")
    missing = [o for o in ops if not family.supports(o, layout)]
    if missing:
        raise ValueError(
            f"--ops {','.join(missing)}: the {family.kind} template does not schedule it on layout {layout!r} "
            f"(its backward passes run grad_input and grad_weight)"
        )
    return ops


# Options that describe one shape, with their defaults; --model reads all of them from the model.
_ONE_SHAPE_OPTIONS = {
    "rows": ("--rows", 4096), "dtype": ("--dtype", "float32"), "layout": ("--layout", "last"),
    "weight_layout": ("--weight-layout", "out_in"), "bias": ("--no-bias", True), "ops": ("--ops", None),
}


def run(args: argparse.Namespace) -> int:
    shape = (args.groups, args.in_features, args.out_features)
    if args.model is not None:
        if any(v is not None for v in shape):
            raise ValueError("--model tunes the shapes the model runs: leave out --groups/--in-features/--out-features")
        given = [flag for name, (flag, default) in _ONE_SHAPE_OPTIONS.items() if getattr(args, name) != default]
        if given:
            raise ValueError(
                f"--model takes rows, dtype, layout, weight layout, bias and ops from the model's layers: "
                f"leave out {', '.join(given)} (--inference tunes the forward ops only)"
            )
        return _run_model(args)
    if args.inference:
        raise ValueError("--inference goes with --model")
    if any(v is None for v in shape):
        raise ValueError("give --groups, --in-features and --out-features (or --model MODULE:FACTORY)")
    return _run_shape(args)


def _check_dtype(family, dtype: str) -> None:
    if dtype not in {str(d).removeprefix("torch.") for d in family.dtypes}:
        names = ", ".join(str(d).removeprefix("torch.") for d in family.dtypes)
        raise ValueError(f"--dtype {dtype}: {family.kind} kernels run {names}; nothing would use this log")


def _print_result(spec, result) -> None:
    from tvmgroup.logs import MIN_GAIN_OVER_DEFAULT

    best = f"{result.best_seconds * 1e6:.1f} us" if math.isfinite(result.best_seconds) else "none"
    status = "already done" if result.trials_after == result.trials_before else f"{result.trials_after - result.trials_before} new"
    if result.exhausted:
        status += "; every distinct schedule of the space is measured"
    versus = ""
    if result.default_seconds is not None and math.isfinite(result.best_seconds):
        used = "lookup uses the log" if result.beats_default else (
            f"lookup keeps the default: under {(MIN_GAIN_OVER_DEFAULT - 1) * 100:.0f}% faster")
        versus = f" against the default's {result.default_seconds * 1e6:.1f} us " \
                 f"({result.default_seconds / result.best_seconds:.2f}x"
        confirmed = result.confirmed
        if confirmed is not None:
            versus += (f"; timed as the layer runs them: {confirmed.best_seconds * 1e6:.1f} against "
                       f"{confirmed.default_seconds * 1e6:.1f} us, "
                       f"{confirmed.default_seconds / confirmed.best_seconds:.2f}x")
        versus += f"; {used})"
    print(f"{spec.key}: {result.trials_after} trials ({status}), best {best}{versus}, log {result.path}", flush=True)


def _run_model(args: argparse.Namespace) -> int:
    from tvmgroup import lookup
    from tvmgroup.discovery import model_from_factory
    from tvmgroup.paths import user_logs_dir
    from tvmgroup.target import target_key
    from tvmgroup.tuning.model import tune_model

    target = _target(args.target) if args.target is not None else None
    rpc = _rpc(args)
    model, inputs = model_from_factory(args.model)
    root = args.output if args.output is not None else user_logs_dir()
    keep = args.keep if args.keep is not None else (8 if args.output is not None else None)
    where = f"on the servers under {args.rpc_key!r} at {args.rpc_tracker[0]}:{args.rpc_tracker[1]}" if rpc else "here"
    print(f"tuning {args.model} for {target_key(target) if target is not None else 'each layer device'}, "
          f"{args.trials} trials per op shape, measured {where} -> {root}", flush=True)
    start = time.perf_counter()
    results = tune_model(
        model, inputs, target=target, trials=args.trials, root=root, backward=not args.inference,
        progress=not args.quiet, on_done=lambda done: _print_result(done.request.spec, done.result),
        space=args.space, keep=keep, seed=args.seed, trials_per_iter=args.batch, rpc=rpc,
    )
    lookup.forget()
    if not results:
        print(f"{args.model}: no tvmgroup layer runs on the example inputs; nothing to tune")
    print(f"{len(results)} op shapes done in {time.perf_counter() - start:.0f} s")
    return 0


def _run_shape(args: argparse.Namespace) -> int:
    from tvmgroup import lookup
    from tvmgroup.compute import OpSpec
    from tvmgroup.paths import user_logs_dir
    from tvmgroup.target import family_of, target_key
    from tvmgroup.tuning.tune import TuneRequest, tune_op, tuning_rows

    target = _target(args.target)
    family = family_of(target)
    _check_dtype(family, args.dtype)
    ops = _ops(args.ops, family, args.layout)
    rpc = _rpc(args)
    rows = tuning_rows(args.rows, target)
    if rows != args.rows:
        multiple = family.row_multiple
        print(f"tvmgroup tune: --rows {args.rows} rounded up to {rows} (tuning needs a multiple of {multiple})", file=sys.stderr)
    root = args.output if args.output is not None else user_logs_dir()
    keep = args.keep if args.keep is not None else (8 if args.output is not None else None)
    where = f", measured on the servers under {args.rpc_key!r}" if rpc else ""
    print(f"tuning for {target_key(target)} at {rows} rows, {args.trials} trials per op, {args.space} space{where} -> {root}")
    start = time.perf_counter()
    for op in ops:
        spec = OpSpec(
            op, args.groups, args.in_features, args.out_features, args.dtype, args.layout, args.bias,
            args.weight_layout,
        )
        req = TuneRequest(spec, target, rows, args.trials, root, args.space, keep, args.seed, args.batch, rpc)
        _print_result(spec, tune_op(req, progress=not args.quiet))
    lookup.forget()
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
