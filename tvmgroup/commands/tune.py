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
        description="Tunes forward/grad_input/grad_weight for one shape. Running the same command again "
        "resumes: only the trials missing from the log are measured.",
    )
    p.add_argument("--groups", type=positive, required=True)
    p.add_argument("--in-features", type=positive, required=True)
    p.add_argument("--out-features", type=positive, required=True)
    p.add_argument("--rows", type=positive, default=4096,
                   help="rows (batch*length) to tune at; rounded up to the target's row multiple (default 4096)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage dtype (default float32); the target must run it (CPU: float32)")
    p.add_argument("--layout", choices=LAYOUTS, default="last")
    p.add_argument("--weight-layout", choices=tuple(WEIGHT_LAYOUTS), default="out_in",
                   help="how the weight is stored: out_in (G, O, K) or in_out (G, K, O) (default out_in)")
    p.add_argument("--no-bias", dest="bias", action="store_false", help="the layer has no bias")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default {','.join(OPS)})")
    p.add_argument("--target", default="llvm", help="'llvm' (this CPU), 'cuda' (this GPU) or 'cuda:sm_XX'")
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


def _ops(text: str) -> list[str]:
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"--ops must be a comma-separated subset of {','.join(OPS)}, got {text!r}")
    return ops


def run(args: argparse.Namespace) -> int:
    from tvmgroup import lookup
    from tvmgroup.compute import OpSpec
    from tvmgroup.paths import user_logs_dir
    from tvmgroup.target import family_of, parse_target, target_key
    from tvmgroup.tuning.tune import TuneRequest, tune_op, tuning_rows

    target = parse_target(args.target)
    family = family_of(target)
    if args.dtype not in {str(d).removeprefix("torch.") for d in family.dtypes}:
        names = ", ".join(str(d).removeprefix("torch.") for d in family.dtypes)
        raise ValueError(f"--dtype {args.dtype}: {family.kind} kernels run {names}; nothing would use this log")
    rows = tuning_rows(args.rows, target)
    if rows != args.rows:
        multiple = family.row_multiple
        print(f"tvmgroup tune: --rows {args.rows} rounded up to {rows} (tuning needs a multiple of {multiple})", file=sys.stderr)
    root = args.output if args.output is not None else user_logs_dir()
    keep = args.keep if args.keep is not None else (8 if args.output is not None else None)
    print(f"tuning for {target_key(target)} at {rows} rows, {args.trials} trials per op, {args.space} space -> {root}")
    start = time.perf_counter()
    for op in _ops(args.ops):
        spec = OpSpec(
            op, args.groups, args.in_features, args.out_features, args.dtype, args.layout, args.bias,
            args.weight_layout,
        )
        req = TuneRequest(spec, target, rows, args.trials, root, args.space, keep, args.seed, args.batch)
        result = tune_op(req, progress=not args.quiet)
        best = f"{result.best_seconds * 1e6:.1f} us" if math.isfinite(result.best_seconds) else "none"
        status = "already done" if result.trials_after == result.trials_before else f"{result.trials_after - result.trials_before} new"
        if result.exhausted:
            status += "; every distinct schedule of the space is measured"
        print(f"{spec.key}: {result.trials_after} trials ({status}), best {best}, log {result.path}")
    lookup.forget()
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
