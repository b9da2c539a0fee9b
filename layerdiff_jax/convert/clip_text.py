"""Loads SD's CLIP text encoder from a `text_encoder/` folder (transformers weights or our converted params)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from layerdiff_jax.convert import core
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.init import abstract_params

_ATTENTION_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0"}


def rename_text_encoder_key(key: str) -> str | None:
    """transformers CLIPTextModel key -> our module path; None for the `position_ids` buffer.

    transformers 4 prefixes every key with `text_model.` (as in SD-1.5 downloads); transformers 5 does not.
    """
    key = key.removeprefix("text_model.")
    if key == "embeddings.position_ids":
        return None
    module, _, leaf = key.rpartition(".")
    parent, _, name = module.rpartition(".")
    if parent.endswith(".self_attn") and name in _ATTENTION_NAMES:
        module = f"{parent}.{_ATTENTION_NAMES[name]}"
    return f"{module}.{leaf}"


def abstract_text_encoder_params(model: CLIPTextTransformer) -> dict:
    """The text encoder's parameter shapes, without allocating."""
    return abstract_params(model, jnp.zeros((1, model.config.max_position_embeddings), jnp.int32))


def load_text_encoder(
    path: str | Path, *, dtype: Any = jnp.float32, attention_impl: str = "auto"
) -> tuple[CLIPTextTransformer, dict]:
    """(module, params) from a folder with config.json and flax_params.safetensors or transformers torch weights."""
    config = core.read_config(path, CLIPTextConfig.from_diffusers_config)
    model = CLIPTextTransformer(config, dtype=dtype, attention_impl=attention_impl)
    return model, core.load_params(path, abstract_text_encoder_params(model), rename_text_encoder_key)
