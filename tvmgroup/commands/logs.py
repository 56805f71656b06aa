"""``tvmgroup logs``: lists the tuning logs that run-time lookup can use, and where they are."""

from __future__ import annotations

import argparse
import math


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="list tuning logs (user and shipped) for this machine's target")
    p.add_argument("--all", action="store_true", help="every target, not only this one")
    p.add_argument("--target", default="llvm", help="'llvm' (default), 'cuda' or 'cuda:sm_XX'")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tvmgroup.paths import shipped_logs_dir, user_logs_dir
    from tvmgroup.target import parse_target, target_key
    from tvmgroup.logs import default_seconds, find_logs, read_records, mean_secs

    key = None if args.all else target_key(parse_target(args.target))
    rows = []
    for origin, root in (("user", user_logs_dir()), ("shipped", shipped_logs_dir())):
        for log in find_logs(root, target_key=key):
            best = min((mean_secs(r[1]) for _, r in read_records(log.path)), default=math.inf)
            best_text = f"{best * 1e6:.1f}" if math.isfinite(best) else "-"
            default = default_seconds(log.meta)
            default_text = f"{default * 1e6:.1f}" if default is not None else "-"
            rows.append((origin, log.target_key, log.spec_key, str(log.rows), log.space, str(log.trials), best_text,
                         default_text, str(log.path)))
    scope = "all targets" if key is None else key
    if not rows:
        print(f"no tuning logs for {scope} (user: {user_logs_dir()}, shipped: {shipped_logs_dir()})")
        return 0
    header = ("origin", "target", "spec", "rows", "space", "trials", "best_us", "default_us", "path")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"tuning logs for {scope}:")
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
