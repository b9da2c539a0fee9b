"""A random toy LayerDiff model folder for the sampling, editing and CLI tests (no compilation).

Parameters are filled from their abstract shapes (`eval_shape`), not by `init`, so building the folder
takes a second or two instead of the ~50 s that jitted inits of four models take on a 2-core machine.
The weights are random but well scaled (fan-in normal kernels, unit norms, an open mask gate), so every
output depends on the inputs, prompts and timesteps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.convert.model_folder import save_layerdiff
from layerdiff_jax.data.tokenizer import build_toy_tokenizer
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.models.clip_text import CLIPTextTransformer
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet
from layerdiff_jax.models.unet import UNet2DConditionModel
from layerdiff_jax.models.vae import AutoencoderKL
from layerdiff_jax.toy import TEXT_WIDTH, make_toy_sd, toy_configs

SIZE = 32  # image side used by the tests: 8x8 latents with the toy's 4x VAE (factor 4, as `trained_size` assumes)
MAX_LAYERS = 3


def random_params(abstract, seed: int):
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == "scale":
            return np.ones(x.shape, np.float32)
        if name == "bias":
            return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)
        if name == "mask_gate":
            return np.float32(0.5)
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def make_random_layerdiff(
    folder: str | Path,
    *,
    max_layers: int = MAX_LAYERS,
    seed: int = 0,
    scheduler: SchedulerConfig = SchedulerConfig(),
    trained_size: int | None = None,
) -> Path:
    """Writes a toy LayerDiff model folder (vae/, text_encoder/, tokenizer/, unet/, layerdiff/, scheduler/),
    recording `trained_size` (an image side) as the training resolution, as training's export does."""
    configs = toy_configs(build_toy_tokenizer().vocab_size)
    unet = UNet2DConditionModel(configs["unet"])
    vae = AutoencoderKL(configs["vae"])
    text = CLIPTextTransformer(configs["text_encoder"])
    sd_params = {
        "unet": random_params(abstract_params(unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, TEXT_WIDTH))), seed),
        "vae": random_params(abstract_params(vae, jnp.zeros((1, 16, 16, 3))), seed + 1),
        "text_encoder": random_params(abstract_params(text, jnp.zeros((1, 77), jnp.int32)), seed + 2),
    }
    folder = make_toy_sd(folder, params=sd_params, overwrite=True)
    unet_config = configs["unet"] if trained_size is None else dataclasses.replace(configs["unet"], sample_size=trained_size // 4)
    model = LayerDiffUNet(unet_config, LayerDiffConfig(max_layers=max_layers, enhancer_heads=4))
    save_layerdiff(folder, model, random_params(abstract_params(model, *model.example_inputs()), seed + 3), scheduler)
    return folder
