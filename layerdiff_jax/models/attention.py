"""All attention in the package goes through `dot_product_attention`.

That single function is where the implementation is chosen (XLA everywhere; cuDNN flash attention on
NVIDIA GPUs), so switching kernels for every model is one config value: `attention_impl`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from layerdiff_jax.models import layers

ATTENTION_IMPLS = ("xla", "cudnn")


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention on (batch, length, heads, head_dim) tensors.

    `mask` is boolean, broadcastable to (batch, heads, q_len, kv_len); True means "may attend".
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {implementation!r}")
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=is_causal, implementation=implementation
    )


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out_0).

    Self-attention when `context` is None, cross-attention otherwise. Tokens are (batch, length, width).
    """

    heads: int
    head_dim: int
    out_features: int | None = None  # defaults to the query width
    qkv_bias: bool = False
    zero_init_out: bool = False  # LayerDiff's new blocks start as the identity
    attention_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, *, mask=None, is_causal=False):
        context = x if context is None else context
        inner = self.heads * self.head_dim
        out_features = self.out_features or x.shape[-1]

        def project(name, tokens):
            y = layers.dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), dtype=self.dtype, name=name)(tokens)
            return y.reshape(*y.shape[:-1], self.heads, self.head_dim)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=self.attention_impl)
        out = out.reshape(*out.shape[:-2], inner)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else nn.initializers.lecun_normal()
        return layers.dense(out_features, axes=("heads", "embed"), kernel_init=out_init, dtype=self.dtype, name="to_out_0")(out)
