"""``tvmgroup cache``: lists or clears the compiled kernels cached on disk."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="list or clear the compiled kernels cached in $TVMGROUP_HOME/kernels",
        description="Lists the kernel cache (default), or clears it. Stale entries (another TVM version, "
        "or code changed since they were built) are never loaded; `clear --stale` removes only those.",
    )
    p.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    p.add_argument("--stale", action="store_true", help="with clear: only the stale entries")
    p.set_defaults(run=run)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def run(args: argparse.Namespace) -> int:
    from tvmgroup.cache_entries import clear, list_entries
    from tvmgroup.paths import kernel_cache_dir

    root = kernel_cache_dir()
    if args.action == "clear":
        removed, freed = clear(root, stale_only=args.stale)
        what = "stale entries" if args.stale else "entries"
        print(f"removed {removed} {what} ({_size(freed)}) from {root}")
        return 0
    if args.stale:
        raise ValueError("--stale goes with `tvmgroup cache clear`")
    entries = list_entries(root)
    if not entries:
        print(f"no cached kernels in {root}")
        return 0
    rows = [
        (e.target_key, e.spec_key, e.variant, e.schedule, str(e.row_tile or "?"), _size(e.size), e.state, e.tvm_version)
        for e in entries
    ]
    header = ("target", "spec", "variant", "schedule", "row_tile", "size", "state", "tvm")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"kernel cache {root}:")
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    total = sum(e.size for e in entries)
    stale = sum(e.stale for e in entries)
    print(f"{len(entries)} kernels, {_size(total)}" + (f", {stale} stale (`tvmgroup cache clear --stale`)" if stale else ""))
    return 0
