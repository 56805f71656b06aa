"""The ``tvmgroup`` command: one subcommand per job.

Each subcommand lives in its own module under :mod:`tvmgroup.commands` and registers itself
through a ``register(subparsers)`` function listed in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under tvmgroup.commands that defines register(subparsers)
COMMANDS = {
    "demo": "tvmgroup.commands.demo",
    "bench": "tvmgroup.commands.bench",
    "tune": "tvmgroup.commands.tune",
    "logs": "tvmgroup.commands.logs",
    "prebuild": "tvmgroup.commands.prebuild",
    "cache": "tvmgroup.commands.cache",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvmgroup", description="Grouped linear layers for PyTorch, with kernels tuned by Apache TVM."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("tvmgroup: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"tvmgroup {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
