"""Image and mask latents of the training records, encoded once per host and reused in every later epoch.

With `config.train.cache_latents` (which needs `sample_posterior = False`: a posterior mean is the same every
time its record is read), the trainer passes each loader batch through a `LatentCache` before the step: records
seen for the first time are encoded by the frozen VAE on this host's first device, the rest come from host
memory, and the step receives `latents` in place of `images` and `masks`. On a small model the VAE's pass over
full-resolution layers and masks is a large share of the step, so every epoch after the first trains faster; the
first runs a little slower, since the host waits for each batch's encoding instead of preparing the next one.
With `keep_masks` the masks stay in the batch beside the latents, for a loss that weights positions by them
(`config.diffusion.object_loss_weight`).
MaxDiffusion caches its latents before training instead; encoding on first use needs no separate stage, which
suits runs that stop on a time budget. Neither grain nor the other libraries have such a stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np

from layerdiff_jax.data.loader import RECORD_KEY
from layerdiff_jax.training.config import ConfigError

LATENTS = "latents"
ENCODED = ("images", "masks")  # the batch's arrays the latents replace
MAX_SHARE_OF_MEMORY = 0.25  # of this host's physical memory


def cache_bytes(num_records: int, max_layers: int, latent_side: int, latent_channels: int, dtype) -> int:
    """Host memory the cache of `num_records` records takes once every record is encoded."""
    return num_records * max_layers * latent_side**2 * latent_channels * np.dtype(dtype).itemsize


def check_fits(nbytes: int, where: str) -> None:
    """ConfigError, before any work, when the full cache would take more than its share of host memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > MAX_SHARE_OF_MEMORY * physical:
        raise ConfigError(
            f"config.train.cache_latents: the latents of {where} take {nbytes / 2**30:.1f} GiB, more than "
            f"{MAX_SHARE_OF_MEMORY:.0%} of this host's {physical / 2**30:.1f} GiB; set it to False"
        )


def _replaced(keep_masks: bool) -> tuple[str, ...]:
    return ("images",) if keep_masks else ENCODED


def with_latents(
    shapes: dict[str, jax.ShapeDtypeStruct], latent_shape: tuple[int, ...], dtype, keep_masks: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
    """A layered batch's shapes (`loader.batch_shapes`) as the cache hands them to the step: `latents` (B, L,
    *latent_shape) in place of images and masks (of images only with `keep_masks`)."""
    batch, layers = shapes["images"].shape[:2]
    out = {key: value for key, value in shapes.items() if key not in _replaced(keep_masks)}
    out[LATENTS] = jax.ShapeDtypeStruct((batch, layers, *latent_shape), dtype)
    return out


class LatentCache:
    """`cache(batch)`: a loader batch (with `record_key`) -> the same batch with `latents` in place of images and
    masks (images only with `keep_masks`). `encode(params, images, masks) -> latents` is jitted here; each record is
    encoded once, the first time it is seen."""

    def __init__(self, encode: Callable, params, keep_masks: bool = False):
        self._encode = jax.jit(encode)
        self._params = params
        self._replaced = _replaced(keep_masks)
        self._latents: dict[int, np.ndarray] = {}
        self.encoded = 0  # records encoded so far

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [int(k) for k in batch[RECORD_KEY]]
        first_rows = {key: i for i, key in reversed(list(enumerate(keys)))}  # a record twice in a batch: its first row
        missing = [i for key, i in first_rows.items() if key not in self._latents]
        if missing:
            # Padded to the batch with its first rows, so one compilation serves every call.
            rows = np.array(missing + [0] * (len(keys) - len(missing)))
            latents = np.asarray(self._encode(self._params, *(batch[name][rows] for name in ENCODED)))
            for i, row in enumerate(missing):
                self._latents[keys[row]] = latents[i]
            self.encoded += len(missing)
        out = {key: value for key, value in batch.items() if key not in (*self._replaced, RECORD_KEY)}
        out[LATENTS] = np.stack([self._latents[key] for key in keys])
        return out
