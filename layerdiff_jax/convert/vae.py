"""Loads SD's VAE from a diffusers `vae/` folder (torch weights or our converted params)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from layerdiff_jax.convert import core
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig

# diffusers < 0.14 named the mid-block attention's projections like this; many SD-1.5 downloads still do.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_vae_key(key: str) -> str:
    """diffusers AutoencoderKL key -> our module path (identity but for the old attention names)."""
    module, _, leaf = key.rpartition(".")
    parent, _, name = module.rpartition(".")
    if ".attentions." in module and name in _OLD_ATTENTION_NAMES:
        module = f"{parent}.{_OLD_ATTENTION_NAMES[name]}"
    return f"{module}.{leaf}"


def abstract_vae_params(model: AutoencoderKL) -> dict:
    """The VAE's parameter shapes, without allocating (the smallest image the encoder accepts)."""
    size = model.config.downsample_factor
    return abstract_params(model, jnp.zeros((1, size, size, model.config.in_channels)))


def load_vae(path: str | Path, *, dtype: Any = jnp.float32, attention_impl: str = "auto") -> tuple[AutoencoderKL, dict]:
    """(module, params) from a folder with config.json and flax_params.safetensors or diffusers torch weights."""
    model = AutoencoderKL(core.read_config(path, VAEConfig.from_diffusers_config), dtype=dtype, attention_impl=attention_impl)
    return model, core.load_params(path, abstract_vae_params(model), rename_vae_key)
