"""What a VAE keeps of the synthetic world: held-out ground truth encoded and decoded, scored as generated
images are. A model that decodes through this VAE cannot be expected to score above these numbers.

- flat images: the base's evaluation requests (`text_to_image`: single objects and composites), their ground
  truth round-tripped and scored with `score_requests`;
- layers: the composites' layered samples, each layer and its mask (3 channels, as training encodes them)
  round-tripped and scored with `prompt_following` as the demo scores generated layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.evaluation.prompt_following import score_sample, summarise
from layerdiff_jax.evaluation.text_to_image import (
    composite_requests,
    reference_images,
    score_requests,
    single_object_requests,
)
from layerdiff_jax.models.vae import AutoencoderKL
from layerdiff_jax.sampling.sampler import layered_sample
from layerdiff_jax.training.autoencoder import layer_images


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(vae: AutoencoderKL, params, x):
    return vae.apply({"params": params}, vae.apply({"params": params}, x, method=vae.encode_mean), method=vae.decode)


def round_trip(vae: AutoencoderKL, params, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """pixels (N, H, W, 3) in [-1, 1] -> the VAE's reconstruction of their posterior means, in [-1, 1]
    (batches padded to `batch_size`, so one compilation serves every call)."""
    out = []
    for i in range(0, len(pixels), batch_size):
        chunk = pixels[i : i + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_reconstruct(vae, params, jnp.asarray(padded, jnp.float32)))[: len(chunk)])
    return np.concatenate(out)


def _uint8_round_trip(vae: AutoencoderKL, params, images: np.ndarray) -> np.ndarray:
    out = round_trip(vae, params, images.astype(np.float32) / 127.5 - 1.0)
    return np.round(np.clip((out + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def round_trip_scores(vae: AutoencoderKL, params, count: int = 48) -> dict[str, dict]:
    """{"single object": scores, "composite": scores, "layers": prompt-following summary} of the VAE's
    reconstructions of `count` held-out requests' ground truth."""
    images, samples = reference_images(count)
    scores = {
        "single object": score_requests(_uint8_round_trip(vae, params, images["single object"]), single_object_requests(count)),
        "composite": score_requests(_uint8_round_trip(vae, params, images["composite"]), composite_requests(count)),
    }
    # Every layer and mask of every sample (as the VAE fit sees them) in one round trip, then split per sample.
    decoded = _uint8_round_trip(vae, params, np.concatenate([layer_images(s) for s in samples])).astype(np.float32) / 255.0
    layered, start = [], 0
    for s in samples:
        n = s.num_layers
        layer_rgb, layer_alpha = decoded[start : start + n], decoded[start + n : start + 2 * n].mean(-1)
        start += 2 * n
        layered.append(score_sample(layered_sample(layer_rgb, layer_alpha, s.global_prompt, s.layer_prompts, {})))
    scores["layers"] = summarise(layered)
    return scores
