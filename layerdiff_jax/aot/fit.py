"""The largest per-chip batch whose programs fit a chip's HBM, found by compiling candidates.

Per-chip memory grows about linearly with the batch, so after two batches that fit the next candidate is where that
line meets the HBM, and after one that does not, where it meets what XLA said it could use (its bytes over). With one
batch that fits and none that does not, the line goes through zero (it rises faster than the true one, which starts
at the batch-independent memory, so its guess falls short of the HBM rather than far past it); with one of each, it
goes through the two (the failure at the HBM plus its bytes over). Between the largest that fits and the smallest that
does not, candidates bisect when the line's guess was tried already, until the two are within 1/64 of each other
(exact below 128; near the HBM the memory XLA plans is not quite linear, and every candidate is a full compile). Each candidate takes minutes and
many GB of host memory for SD-1.5-size programs, and the most near the HBM, where XLA works hardest to fit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Generic, TypeVar

from layerdiff_jax.aot.analysis import DoesNotFit

log = logging.getLogger(__name__)
Result = TypeVar("Result")


@dataclasses.dataclass(frozen=True)
class Search(Generic[Result]):
    batch: int | None  # the largest that fits (within 1/64 of `failed_batch`); None: not even 1
    result: Result | None  # what `compile_at(batch)` returned
    smallest_failure: DoesNotFit | None  # at `failed_batch`
    failed_batch: int | None  # the smallest batch that does not fit; None when `limit` fits (or `start`, if larger)
    tries: tuple[int, ...]  # the batches compiled, in order


def largest_batch(
    compile_at: Callable[[int], tuple[Result, int]], hbm_bytes: int, *, start: int = 1, limit: int = 1 << 16
) -> Search[Result]:
    """`compile_at(batch)` -> (result, per-chip bytes), raising DoesNotFit when the batch does not fit."""
    fits: dict[int, tuple[Result, int]] = {}
    failures: dict[int, DoesNotFit] = {}
    tries = []

    def attempt(batch: int) -> None:
        tries.append(batch)
        try:
            fits[batch] = compile_at(batch)
            log.info("batch %d per chip fits: %.2f GiB", batch, fits[batch][1] / 2**30)
        except DoesNotFit as e:
            log.info("batch %d per chip: %s", batch, e)
            failures[batch] = e

    def slope() -> float | None:
        """Bytes per unit of batch, from the two largest batches that fit, else (XLA rematerialises more as memory gets
        short, so near the HBM a larger batch can even plan less) from the smallest and the largest, else from the
        largest that fits and the smallest failure that says its bytes over."""
        ordered = sorted(fits)
        points = [(ordered[-2], ordered[-1]), (ordered[0], ordered[-1])] if len(ordered) > 1 else []
        for low, high in points:
            rise = (fits[high][1] - fits[low][1]) / (high - low)
            if rise > 0:
                return rise
        over = sorted(b for b, e in failures.items() if e.over_bytes and ordered and b > ordered[-1])
        if over:
            low, high = ordered[-1], over[0]
            rise = (hbm_bytes + failures[high].over_bytes - fits[low][1]) / (high - low)
            return rise if rise > 0 else None
        return None

    attempt(max(start, 1))
    while not failures and max(fits) < limit:  # grow until a batch does not fit
        last, rise = max(fits), slope()
        aim = last + int((hbm_bytes - fits[last][1]) / (rise or max(fits[last][1], 1) / last))
        attempt(min(max(aim, last + 1), limit))
    if not fits and min(failures) > 1:
        attempt(1)
    while fits and failures and min(failures) - max(fits) > max(1, max(fits) // 64):  # close in between the two
        low, high, rise = max(fits), min(failures), slope()
        over = failures[high].over_bytes
        guess = high - math.ceil(over / rise) if rise and over else None
        if guess == low:  # the line says the largest that fits is found: check the next one
            guess = low + 1
        elif guess is None or not low < guess < high:
            guess = (low + high) // 2
        attempt(guess)
    best = max(fits) if fits else None
    high = min(failures) if failures else None
    return Search(best, fits[best][0] if best else None, failures.get(high), high, tuple(tries))
