"""The sampling settings, checked in one place: by the sampler, by layer editing and by the command-line tools.

Imports nothing heavy, so the tools check their arguments with it before loading JAX. Every message starts
with the setting's name (the tools print it as `--<message>`).
"""

from __future__ import annotations

import math
import numbers
import re

MAX_SEED = 2**32 - 1
# The samples of one run, all its requests together: the run lists a job per sample before it starts and writes
# a folder per sample. 100,000 is days of sampling at the paper's 100 steps and is listed at once; more is a typo
# or a job to split into runs (a billion would be listed for minutes and exhaust memory before sampling began).
MAX_SAMPLES = 100_000
# An image side. The SD VAE decodes through 128-channel float32 activations at full resolution: 32 GiB for one
# image at 8192 px, more than an accelerator holds. Smaller sizes that do not fit are refused by the sampler's
# memory check before they run.
MAX_IMAGE_SIDE = 8192
# The defaults of the sampler, layer editing and their tools (the paper samples 100 DDIM steps at guidance 3).
DEFAULT_STEPS = 100
DEFAULT_GUIDANCE = 3.0
DEFAULT_STRENGTH = 0.25  # layer restyling: noise to the 25th of 100 DDIM steps, as the paper restyles
BACKGROUND_PROMPT = "the background"  # the background's prompt when none is given, and every foreground's negative
# Unicode category Cc (C0, DEL, C1) and lone surrogates (undecodable command-line bytes): not prompt text, and
# most of them cannot be written to a layered file's layer names (XML 1.0).
_NOT_PROMPT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


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
    num_samples: int | None = None,
    batch_size: int | None = None,
    size: tuple[int, int] | None = None,
    num_train_timesteps: int | None = None,
) -> None:
    """Raises RequestError naming the first setting out of range; settings given as None are not checked.

    steps: an integer >= 1 (<= num_train_timesteps when that is given). guidance: finite, >= 0 (1 = no
    guidance). eta: finite, in [0, 1] (0 = DDIM, 1 = DDPM's variance). seed: an integer in [0, 2**32 - 1].
    strength (layer restyling): in (0, 1], leaving at least one of the `steps` steps. num_samples: an integer
    in [1, MAX_SAMPLES]. batch_size: an integer >= 1. size: (H, W), integers in [1, MAX_IMAGE_SIDE].
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
    if num_samples is not None and not (_is_int(num_samples) and 1 <= num_samples <= MAX_SAMPLES):
        raise RequestError(f"num_samples must be an integer in [1, {MAX_SAMPLES}] (the samples of one run), got {num_samples!r}")
    if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
        raise RequestError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if size is not None and not (
        isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) and 1 <= s <= MAX_IMAGE_SIDE for s in size)
    ):
        raise RequestError(f"size must be two integers (H, W) in [1, {MAX_IMAGE_SIDE}], got {size!r}")


def check_prompt(name: str, text: str) -> None:
    """Raises RequestError naming `name`, the character (escaped) and its position when `text` is not a string
    or holds a control character or a lone surrogate (a byte the command line could not decode).

    Every control character is refused, tab and newline included: a prompt is one line of text, and XML
    attributes (the layer names of layers.ora) would fold them into spaces.
    """
    if not isinstance(text, str):
        raise RequestError(f"{name} must be a string, got {text!r}")
    bad = _NOT_PROMPT_TEXT.search(text)
    if bad:
        char = bad.group()
        kind = "undecodable byte" if "\ud800" <= char <= "\udfff" else "control character"
        raise RequestError(
            f"{name} holds the {kind} {ascii(char)[1:-1]} at position {bad.start()}; a prompt is one line of text"
            " without control characters (tab and newline included)"
        )
