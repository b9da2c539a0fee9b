"""The backend the models are traced for: JAX's default backend, or the one an ahead-of-time compile targets.

The models pick kernels by backend (the fused CPU kernels, cuDNN or splash attention). A program compiled on a CPU
machine for a TPU slice (`layerdiff_jax.aot`) is traced inside `tracing_for("tpu")`, so that it holds what a TPU
runs, not CPU custom calls.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("layerdiff_target_backend", default=None)


def target_backend() -> str:
    """"cpu", "gpu" or "tpu": the platform of the program being traced."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def tracing_for(platform: str) -> Iterator[None]:
    """Models traced inside choose their kernels for `platform` instead of the default backend."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
