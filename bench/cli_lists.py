"""Comma-separated list arguments of the benchmarks' command lines (argparse `type=` functions)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable


def positive(kind: type = float, example: str = "R1,R2") -> Callable[[str], list]:
    """`kind` values, all positive and finite: "0.5,1,2" -> [0.5, 1.0, 2.0]."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> list:
        values = [kind(x) for x in text.split(",") if x.strip()]
        if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
            raise argparse.ArgumentTypeError(f"expected positive {noun} {example},..., got {text!r}")
        return values

    return parse


def choices(allowed: Iterable[str], what: str = "names") -> Callable[[str], list[str]]:
    """Names from `allowed`: "a,b" -> ["a", "b"]; an unknown one is an error that lists them."""
    allowed = list(allowed)

    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
        return names

    return parse
