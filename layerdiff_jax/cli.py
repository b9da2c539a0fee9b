"""What the command-line tools share: argparse types (a value out of range exits 2 with the reason), printing the
package's log records as the tool's own lines, and one-line reports of bad absl flags and config files.

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


def config_problem(error: BaseException) -> str:
    """One line for a --config file that does not load or an override that does not apply (ml_collections
    raises chained KeyErrors, AttributeErrors and OSErrors, some of many lines)."""
    chain = [error]
    while chain[-1].__context__ is not None and len(chain) < 10:
        chain.append(chain[-1].__context__)
    for e in chain:  # the outermost KeyError holds the field name and ml_collections' "Did you mean"
        if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
            field, *hint = e.args[0].splitlines()
            return f"no config field {field}" + (f" ({' '.join(hint)})" if hint else "")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "Errno" in line), lines[-1] if lines else type(error).__name__)
    if isinstance(error, (SyntaxError, NameError, ImportError)):
        return f"the --config file does not load: {type(error).__name__}: {reason}"
    return f"the --config file does not load: {reason}" if isinstance(error, OSError) else reason


def absl_flags_parser(tool: str) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run`: absl's flag parsing, but a bad flag or config override is one line
    ("`tool`: ...") and exit status 2, not a traceback."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            message = str(e)
        except (KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError, NameError, ImportError) as e:
            message = f"bad config: {config_problem(e)}"
        print(f"{tool}: {message}", file=sys.stderr)
        sys.exit(2)

    return parse


def stopped(tool: str, error: BaseException, out: object) -> int:
    """Prints the one line a tool that writes into the output folder `out` ends with when one of the errors it
    expects or Ctrl-C (KeyboardInterrupt) stops it, and returns the exit status for it: 1, or 130 for Ctrl-C. What
    was written stays, in a folder marked unfinished (`fileio.claim_output_folder`)."""
    if isinstance(error, KeyboardInterrupt):
        print(f"{tool}: interrupted; {out} is marked as unfinished (rerun with --overwrite)", file=sys.stderr)
        return 130
    print(f"{tool}: error: {error}", file=sys.stderr)
    return 1


def bad_samples(error: Exception, skip_bad: bool, skipped: str) -> int:
    """Prints the lines a tool that reads sample folders ends with on a bad one: the error and, unless --skip-bad
    was given, that --skip-bad skips `skipped`; returns the exit status for it (1)."""
    hint = "" if skip_bad else f"\n(use --skip-bad to skip {skipped})"
    print(f"error: {error}{hint}", file=sys.stderr)
    return 1
