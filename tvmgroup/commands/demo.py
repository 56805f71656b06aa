"""``tvmgroup demo``: checks the layer against nn.Conv1d on this machine and times both."""

from __future__ import annotations

import argparse

import torch

from tvmgroup.bench.timing import time_calls


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="check GroupedLinear against nn.Conv1d and time both")
    p.add_argument("--rows", type=int, default=4096, help="batch*length rows (default 4096)")
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--in-features", type=int, default=64)
    p.add_argument("--out-features", type=int, default=64)
    p.set_defaults(run=run)


def _median_ms(fn, repeats: int = 10) -> float:
    return time_calls(lambda _: fn(), warmup=1, repeats=repeats).median_ms


def run(args: argparse.Namespace) -> int:
    from tvmgroup import GroupedLinear

    g, k, o = args.groups, args.in_features, args.out_features
    conv = torch.nn.Conv1d(g * k, g * o, kernel_size=1, groups=g)
    layer = GroupedLinear.from_conv1d(conv)
    x = torch.randn(1, g * k, args.rows)
    with torch.no_grad():
        err = (layer(x).double() - conv(x).double()).abs().max().item()
        print(f"max |GroupedLinear - Conv1d| = {err:.2e} over {x.numel()} inputs")
        t_conv = _median_ms(lambda: conv(x))
        t_layer = _median_ms(lambda: layer(x))
    print(f"forward, rows={args.rows} groups={g} {k}->{o}: Conv1d {t_conv:.2f} ms, tvmgroup {t_layer:.2f} ms")
    return 0 if err < 1e-3 else 1
