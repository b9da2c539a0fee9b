"""Argument types the command-line tools share (argparse `type=`): a value out of range exits 2 with the reason.

Imports nothing heavy, so the tools check their arguments before loading JAX or TensorFlow.
"""

from __future__ import annotations

import argparse
import math


def int_in(lo: int, hi: float = math.inf, why: str = ""):
    """An argparse type: an integer in [lo, hi]; `why` (e.g. "(the shapes must fit)") follows the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            limit = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer {limit}{' ' + why if why else ''}, got {text!r}")
        return value

    return parse
