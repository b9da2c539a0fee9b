"""The layers Stable Diffusion's UNet is built from, named like diffusers' torch modules.

Submodule names match diffusers (`norm1`, `conv1`, `time_emb_proj`, `attn1`, `ff/net_0/proj`, ...) so
converting a torch state dict is a plain rename of list indices. Every tensor is NHWC (images) or
(batch, length, width) (tokens); parameters are float32 and `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.models import cpu_kernels, layers
from layerdiff_jax.models.attention import Attention

Dtype = Any

# diffusers' Transformer2DModel fixes its input GroupNorm's epsilon regardless of the UNet's norm_eps.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5


def timestep_sinusoid(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' `get_timestep_embedding` (max period 10000): (N,) int or float -> (N, dim) float32."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 on the sinusoidal embedding."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return layers.dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the projected time embedding (if any: the VAE has none) added in between; residual."""

    out_channels: int
    norm_num_groups: int
    norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb=None):
        h = layers.group_norm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, silu=True, name="norm1")(x)
        h = layers.conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
        if emb is not None:
            t = layers.dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(emb))
            h = h + t[:, None, None, :]
        h = layers.group_norm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, silu=True, name="norm2")(h)
        h = layers.conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class GEGLU(nn.Module):
    """proj to 2x`features`, then value * gelu(gate) (exact gelu, as torch's default)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = layers.dense(2 * self.features, dtype=self.dtype, name="proj")(x)
        if cpu_kernels.runs_on(h):  # one pass each way instead of XLA:CPU's several for erf
            tokens = h.reshape(h.shape[0], math.prod(h.shape[1:-1]), h.shape[-1])
            return cpu_kernels.geglu(tokens).reshape(*h.shape[:-1], self.features)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: net_0 (GEGLU to 4x width), net_2 (back to the input width)."""

    mult: int = 4
    zero_init_out: bool = False  # LayerDiff's new blocks start as the identity
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else nn.initializers.lecun_normal()
        return layers.dense(x.shape[-1], axes=("mlp", "embed"), kernel_init=out_init, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to `context`, GEGLU feed-forward; each residual."""

    num_heads: int
    head_dim: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        def attention(name):
            return Attention(self.num_heads, self.head_dim, attention_impl=self.attention_impl, dtype=self.dtype, name=name)

        def norm(name):
            return layers.layer_norm(TRANSFORMER_LAYER_NORM_EPS, dtype=self.dtype, name=name)

        x = x + attention("attn1")(norm("norm1")(x))
        x = x + attention("attn2")(norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """SD-1.x spatial transformer: GroupNorm, 1x1 proj_in, transformer blocks over the H*W tokens, proj_out; residual.

    proj_in/proj_out are Dense layers on NHWC, which is what a 1x1 convolution is (the converter squeezes
    the torch (out, in, 1, 1) weights).
    """

    num_heads: int
    norm_num_groups: int
    num_layers: int = 1
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        batch, height, width, channels = x.shape
        h = layers.group_norm(self.norm_num_groups, TRANSFORMER_GROUP_NORM_EPS, dtype=self.dtype, name="norm")(x)
        h = layers.dense(channels, dtype=self.dtype, name="proj_in")(h)
        h = h.reshape(batch, height * width, channels)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.num_heads,
                channels // self.num_heads,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(h, context)
        h = h.reshape(batch, height, width, channels)
        return x + layers.dense(channels, axes=("mlp", "embed"), dtype=self.dtype, name="proj_out")(h)


class Downsample2D(nn.Module):
    """3x3 convolution, stride 2. The UNet pads 1 on each side (torch's padding=1, not XLA's SAME): H -> ceil(H/2);
    the VAE pads only bottom/right by one, as diffusers' VAE does."""

    out_channels: int
    padding: tuple = ((1, 1), (1, 1))
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return layers.conv(self.out_channels, 3, strides=2, padding=self.padding, dtype=self.dtype, name="conv")(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # torch's nearest interpolation: floor(i * (float32)(in / out)), clamped; exact for the usual x2.
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32), in_size - 1)


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC `x` to spatial `size`, index-for-index like torch's F.interpolate."""
    if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):  # the common case, as a broadcast rather than a gather
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = _nearest_indices(x.shape[1], size[0])
    cols = _nearest_indices(x.shape[2], size[1])
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest upsampling (x2, or to an explicit `output_size` for odd skip sizes), then a 3x3 convolution."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: Sequence[int] | None = None):
        size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else tuple(output_size)
        x = resize_nearest(x, size)
        return layers.conv(self.out_channels, 3, dtype=self.dtype, name="conv")(x)
