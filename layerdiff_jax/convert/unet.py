"""Loading SD-1.x UNet weights (a diffusers `unet/` folder, or our converted one) into the Flax UNet."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from layerdiff_jax.convert import core
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig


def rename(torch_key: str) -> str:
    """diffusers UNet key -> our path: the Flax tree uses diffusers' module names, so this is the identity
    (core joins list indices: `down_blocks.0.attentions.1.proj_in.weight` -> down_blocks_0/attentions_1/proj_in)."""
    return torch_key


def abstract_unet_params(unet: UNet2DConditionModel) -> dict:
    """The UNet's parameter tree as ShapeDtypeStructs (nothing allocated); parameter shapes don't depend on
    the latent size, so a 1x8x8 example suffices."""
    c = unet.config
    return abstract_params(
        unet,
        jnp.zeros((1, 8, 8, c.in_channels), jnp.float32),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, c.cross_attention_dim), jnp.float32),
    )


def load_unet(
    path: str | Path, *, dtype=jnp.float32, attention_impl: str = "auto", remat: bool = False
) -> tuple[UNet2DConditionModel, dict]:
    """A UNet component folder (`config.json` + `flax_params.safetensors`, or diffusers torch weights)
    -> (module, float32 numpy params)."""
    config = core.read_config(path, UNetConfig.from_diffusers_config)
    unet = UNet2DConditionModel(config, dtype=dtype, attention_impl=attention_impl, remat=remat)
    return unet, core.load_params(path, abstract_unet_params(unet), rename)
