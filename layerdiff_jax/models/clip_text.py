"""CLIP's text transformer (transformers' `CLIPTextModel`, last hidden state only) in Flax.

Submodules are named like transformers' torch modules (`embeddings/token_embedding`,
`encoder/layers_0/self_attn`, `mlp/fc1`, `final_layer_norm`); self-attention goes through the shared
`Attention`, whose projections are named to_q/to_k/to_v/to_out_0 (transformers: q/k/v/out_proj).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from layerdiff_jax.models import layers
from layerdiff_jax.models.attention import Attention
from layerdiff_jax.models.config_types import check_field_types


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text encoder. Defaults are transformers' defaults; `sd15()` is CLIP ViT-L/14's."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text config: hidden_act={self.hidden_act!r} is not supported (one of {tuple(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP text config: hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        return cls(hidden_size=768, intermediate_size=3072, num_attention_heads=12)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """Reads a transformers `CLIPTextModel` config.json dict (an SD folder's text_encoder/config.json).

        transformers configs carry many generic fields (token ids, dropout, dtype, projection_dim...)
        that do not change the last hidden state at inference; only the architecture fields are read.
        """
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"CLIP text config: model_type is {model_type!r}, expected 'clip_text_model'")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields}
        check_field_types(cls, values)
        return cls(**values)

    def to_diffusers_config(self) -> dict[str, Any]:
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(input_ids.shape[-1])
        )
        return tokens + positions


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = layers.dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        return layers.dense(cfg.hidden_size, axes=("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: causal self-attention then MLP, each with a residual."""

    config: CLIPTextConfig
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        heads = cfg.num_attention_heads
        h = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + Attention(
            heads=heads,
            head_dim=cfg.hidden_size // heads,
            qkv_bias=True,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name="self_attn",
        )(h, is_causal=True)
        h = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(cfg, dtype=self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = layers.constrain_tokens(CLIPEncoderLayer(self.config, attention_impl=self.attention_impl, dtype=self.dtype, name=f"layers_{i}")(x))
        return x


class CLIPTextTransformer(nn.Module):
    """Token ids (B, T) -> last hidden state (B, T, hidden_size), float32 whatever the compute `dtype`.

    No padding mask, as in Stable Diffusion: prompts are padded to max_position_embeddings and the
    causal mask keeps real tokens from seeing the padding.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIPTextTransformer expects integer token ids of shape (batch, length), got {input_ids.dtype}{input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIPTextTransformer: {input_ids.shape[1]} tokens exceed max_position_embeddings={cfg.max_position_embeddings}"
            )
        x = layers.constrain_tokens(CLIPTextEmbeddings(cfg, dtype=self.dtype, name="embeddings")(input_ids))
        x = CLIPEncoder(cfg, attention_impl=self.attention_impl, dtype=self.dtype, name="encoder")(x)
        x = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        return x.astype(jnp.float32)
