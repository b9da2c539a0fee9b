"""The sampling settings, checked in one place: by the sampler, by layer editing and by the command-line tools.

Imports nothing heavy, so the tools check their arguments with it before loading JAX. Every message starts
with the setting's name (the tools print it as `--<message>`).
"""

from __future__ import annotations

import math
import numbers

MAX_SEED = 2**32 - 1
# The defaults of the sampler, layer editing and their tools (the paper samples 100 DDIM steps at guidance 3).
DEFAULT_STEPS = 100
DEFAULT_GUIDANCE = 3.0
DEFAULT_STRENGTH = 0.25  # layer restyling: noise to the 25th of 100 DDIM steps, as the paper restyles
BACKGROUND_PROMPT = "the background"  # the background's prompt when none is given, and every foreground's negative


class RequestError(ValueError):
    """A sampling or editing request that cannot be served; the message says which and why."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_settings(
    *,
    steps: int | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    seed: int | None = None,
    strength: float | None = None,
    num_train_timesteps: int | None = None,
) -> None:
    """Raises RequestError naming the first setting out of range; settings given as None are not checked.

    steps: an integer >= 1 (<= num_train_timesteps when that is given). guidance: finite, >= 0 (1 = no
    guidance). eta: finite, in [0, 1] (0 = DDIM, 1 = DDPM's variance). seed: an integer in [0, 2**32 - 1].
    strength (layer restyling): in (0, 1], leaving at least one of the `steps` steps.
    """
    if steps is not None:
        top = num_train_timesteps if num_train_timesteps is not None else math.inf
        if not _is_int(steps) or not 1 <= steps <= top:
            limit = f"in [1, {num_train_timesteps}]" if num_train_timesteps is not None else ">= 1"
            raise RequestError(f"steps must be an integer {limit}, got {steps!r}")
    if guidance is not None and not (_is_finite(guidance) and guidance >= 0):
        raise RequestError(f"guidance must be a finite number >= 0 (1 = no guidance), got {guidance!r}")
    if eta is not None and not (_is_finite(eta) and 0 <= eta <= 1):
        raise RequestError(f"eta must be a number in [0, 1] (0 = deterministic DDIM), got {eta!r}")
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise RequestError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if strength is not None:
        if not (_is_finite(strength) and 0 < strength <= 1):
            raise RequestError(f"strength must be a number in (0, 1], got {strength!r}")
        if steps is not None and int(steps * strength) < 1:
            raise RequestError(f"strength {strength} leaves none of the {steps} steps: raise it or the steps")
