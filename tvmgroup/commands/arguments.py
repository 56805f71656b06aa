"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, with an error naming what came."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive = int_at_least(1)
non_negative = int_at_least(0)
