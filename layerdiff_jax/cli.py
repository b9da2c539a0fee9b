"""What the command-line tools share: argparse types (a value out of range exits 2 with the reason) and printing the
package's log records as the tool's own lines.

Imports nothing heavy, so the tools check their arguments before loading JAX or TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import TextIO


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


def attach_package_log(stream: TextIO, fmt: str, level: int | None = None) -> Callable[[], None]:
    """Prints the package's log records to `stream` in `fmt` (at `level` and above, if given) until the returned
    function is called."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    logger = logging.getLogger("layerdiff_jax")
    previous = logger.level
    logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)

    def detach() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    return detach


def interrupted(prefix: str, written: int, what: str, out: object) -> int:
    """Prints the one line a tool that writes `what`s into `out` ends with on Ctrl-C, and returns the shell's exit
    status for it (130). What was written stays, in a folder marked unfinished (`fileio.check_finished`)."""
    kept = f"{out} keeps them, marked as unfinished (rerun with --overwrite)" if written else "nothing written"
    print(f"{prefix}interrupted after {written} {what}; {kept}", file=sys.stderr)
    return 130
