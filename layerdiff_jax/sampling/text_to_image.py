"""Plain text-to-image sampling from an SD folder: what the base model draws before LayerDiff fine-tuning.

One jitted program per batch shape: text encoding, the whole DDIM loop with classifier-free guidance against
the empty prompt (one `lax.scan`), and VAE decoding.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from layerdiff_jax.convert.model_folder import load_scheduler_config
from layerdiff_jax.convert.sd_folder import load_sd
from layerdiff_jax.data.tokenizer import load_tokenizer
from layerdiff_jax.diffusion.ddim import ddim_sample, ddim_timesteps
from layerdiff_jax.diffusion.guidance import guided_model_fn
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.diffusion.settings import check_sampling_settings
from layerdiff_jax.models.vae import AutoencoderKL


def text_to_image_program(unet, vae, text_encoder, prediction_type: str = "epsilon"):
    """jit(params, schedule, ids, uncond_ids, noise, timesteps, scale) -> images in [0, 1]: text encoding, the whole
    DDIM loop with classifier-free guidance (one `lax.scan`) and VAE decoding, as one XLA program. `params` is
    {"unet", "vae", "text_encoder"}; timesteps and the scale are traced, so changing them does not recompile."""

    def run(params, schedule, ids, uncond_ids, noise, timesteps, scale):
        cond = text_encoder.apply({"params": params["text_encoder"]}, ids)
        uncond = text_encoder.apply({"params": params["text_encoder"]}, uncond_ids)
        apply = lambda x, t, context: unet.apply({"params": params["unet"]}, x, t, context)  # noqa: E731
        latents = ddim_sample(guided_model_fn(apply, cond, uncond, scale), noise, timesteps, schedule, prediction_type=prediction_type)
        images = vae.apply({"params": params["vae"]}, latents.astype(vae.dtype), method=AutoencoderKL.decode_latents)
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    return jax.jit(run)


class TextToImagePipeline:
    """SD UNet + VAE + CLIP text encoder + tokenizer from one SD folder; `generate` gives uint8 images."""

    def __init__(self, components, tokenizer, scheduler: SchedulerConfig):
        (self.unet, unet_params), (self.vae, vae_params), (self.text_encoder, text_params) = (
            components["unet"], components["vae"], components["text_encoder"]
        )
        self.params = jax.device_put({"unet": unet_params, "vae": vae_params, "text_encoder": text_params})
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.schedule = scheduler.make_schedule()

    @classmethod
    def load(cls, folder: str | Path) -> "TextToImagePipeline":
        folder = Path(folder)
        return cls(load_sd(folder), load_tokenizer(folder), load_scheduler_config(folder))

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsample_factor

    @functools.cached_property
    def _program(self):
        return text_to_image_program(self.unet, self.vae, self.text_encoder, self.scheduler.prediction_type)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        steps: int = 25,
        guidance: float = 3.0,
        seed: int = 0,
        size: int = 64,
        batch_size: int = 16,
        progress: bool = True,
    ) -> np.ndarray:
        """uint8 images (N, size, size, 3), one per prompt; prompt i's noise comes from key (seed, i)."""
        if size % (self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)):
            raise ValueError(f"size {size} is not a multiple of what this VAE and UNet take")
        check_sampling_settings(steps=steps, guidance=guidance, seed=seed, num_train_timesteps=self.scheduler.num_train_timesteps)
        latent = (size // self.vae_factor, size // self.vae_factor, self.unet.config.in_channels)
        timesteps = ddim_timesteps(steps, self.scheduler.num_train_timesteps)
        uncond_ids = self.tokenizer([""] * batch_size)
        out = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="text-to-image", disable=not progress):
            batch = list(prompts[start : start + batch_size])
            padded = batch + [batch[-1]] * (batch_size - len(batch))  # one compiled shape for every batch
            ids = self.tokenizer(padded)
            keys = [jax.random.fold_in(jax.random.key(seed), start + i) for i in range(batch_size)]
            noise = jnp.stack([jax.random.normal(k, latent) for k in keys])
            images = self._program(
                self.params, self.schedule, ids, uncond_ids, noise, timesteps, jnp.float32(guidance)
            )
            out.append(np.round(np.asarray(images[: len(batch)]) * 255).astype(np.uint8))
        return np.concatenate(out)
