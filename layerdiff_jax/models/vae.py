"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`) in Flax, NHWC.

Submodules are named like diffusers' torch modules (list indices joined with "_"), so converting torch
weights is a near-identity rename (`layerdiff_jax.convert.vae`).

Latent scaling: `encode`/`encode_mean` return the posterior in the VAE's own units and `decode` takes
latents in those units. The diffusion model works on latents multiplied by `config.scaling_factor`
(0.18215 for SD 1.5); `encode_latents`/`decode_latents` apply it, so no other code holds the constant.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from layerdiff_jax.mesh import interleave_rows
from layerdiff_jax.models import layers
from layerdiff_jax.models.attention import Attention
from layerdiff_jax.models.config_types import check_field_types
from layerdiff_jax.models.unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
_NORM_EPS = 1e-6  # diffusers' VAE uses 1e-6 in every GroupNorm
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

# Diffusers config fields that do not change the computation, and the values we require for the
# fields whose other settings we do not implement.
_IGNORED_FIELDS = ("force_upcast",)  # a torch fp16 hint
_REQUIRED_VALUES = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL. Defaults are diffusers' defaults; `sd15()` is SD 1.5's VAE.

    Every block is a DownEncoderBlock2D (encoder) / UpDecoderBlock2D (decoder), one per entry of
    `block_out_channels`. `sample_size` only matters to diffusers' tiling; it is kept for round trips.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215

    @classmethod
    def sd15(cls) -> "VAEConfig":
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Reads a diffusers `AutoencoderKL` config.json dict; unsupported settings raise ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        n_blocks = len(config.get("block_out_channels", cls.block_out_channels))
        for key, value in config.items():
            if key == "_class_name" and value != "AutoencoderKL":
                raise ValueError(f"VAE config: _class_name is {value!r}, only 'AutoencoderKL' is supported")
            if key.startswith("_") or key in _IGNORED_FIELDS:
                continue
            if key in _REQUIRED_VALUES:
                if value != _REQUIRED_VALUES[key]:
                    raise ValueError(f"VAE config: {key}={value!r} is not supported (only {_REQUIRED_VALUES[key]!r})")
            elif key in ("down_block_types", "up_block_types"):
                expected = DOWN_BLOCK if key == "down_block_types" else UP_BLOCK
                if list(value) != [expected] * n_blocks:
                    raise ValueError(
                        f"VAE config: {key}={value!r} is not supported: expected {n_blocks} x {expected!r} "
                        "(one per block_out_channels entry)"
                    )
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value  # JSON lists -> hashable tuples
            else:
                raise ValueError(f"VAE config: unknown field {key!r}")
        check_field_types(cls, kwargs)
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict[str, Any]:
        n_blocks = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [DOWN_BLOCK] * n_blocks,
            "up_block_types": [UP_BLOCK] * n_blocks,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "scaling_factor": self.scaling_factor,
        }


def sample_posterior(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior N(mean, exp(logvar)), in unscaled VAE units."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


class SpatialSelfAttention(nn.Module):
    """The mid-block attention: GroupNorm, single-head self-attention over all pixels, residual.

    The shared `Attention` lives in this module's own scope, so its to_q/to_k/to_v/to_out_0 sit next
    to group_norm exactly as in diffusers' `Attention(residual_connection=True, norm_num_groups=...)`.
    """

    channels: int
    groups: int
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    def setup(self):
        self.group_norm = layers.group_norm(self.groups, _NORM_EPS, dtype=self.dtype, name="group_norm")
        self.attention = Attention(
            heads=1, head_dim=self.channels, qkv_bias=True, attention_impl=self.attention_impl, dtype=self.dtype
        )
        nn.share_scope(self, self.attention)

    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return x + self.attention(tokens).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D without a time embedding: resnet, attention, resnet."""

    groups: int
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        x = ResnetBlock2D(channels, self.groups, _NORM_EPS, dtype=self.dtype, name="resnets_0")(x)
        x = SpatialSelfAttention(channels, self.groups, attention_impl=self.attention_impl, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(channels, self.groups, _NORM_EPS, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _NORM_EPS, dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(x.shape[-1], padding=((0, 1), (0, 1)), dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _NORM_EPS, dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images (B, H, W, in_channels) -> posterior moments (B, H/f, W/f, 2 * latent_channels)."""

    config: VAEConfig
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, groups = self.config, self.config.norm_num_groups
        x = layers.conv(cfg.block_out_channels[0], 3, dtype=self.dtype, name="conv_in")(x)
        for i, channels in enumerate(cfg.block_out_channels):
            is_last = i == len(cfg.block_out_channels) - 1
            x = DownEncoderBlock(
                channels, cfg.layers_per_block, groups, add_downsample=not is_last, dtype=self.dtype, name=f"down_blocks_{i}"
            )(x)
        x = MidBlock(groups, attention_impl=self.attention_impl, dtype=self.dtype, name="mid_block")(x)
        x = layers.group_norm(groups, _NORM_EPS, dtype=self.dtype, silu=True, name="conv_norm_out")(x)
        return layers.conv(2 * cfg.latent_channels, 3, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    config: VAEConfig
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, groups = self.config, self.config.norm_num_groups
        widths = tuple(reversed(cfg.block_out_channels))
        x = layers.conv(widths[0], 3, dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(groups, attention_impl=self.attention_impl, dtype=self.dtype, name="mid_block")(x)
        for i, channels in enumerate(widths):
            is_last = i == len(widths) - 1
            x = UpDecoderBlock(
                channels, cfg.layers_per_block + 1, groups, add_upsample=not is_last, dtype=self.dtype, name=f"up_blocks_{i}"
            )(x)
        x = layers.group_norm(groups, _NORM_EPS, dtype=self.dtype, silu=True, name="conv_norm_out")(x)
        return layers.conv(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


def encode_layers(vae: "AutoencoderKL", params, images: jax.Array, masks: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Layered samples -> LayerDiff's latents: images (B, L, H, W, 3) in [-1, 1] and masks (B, L, H, W, 1) in [0, 1]
    -> (B, L, h, w, 2C), each layer's image latent then its mask latent (the mask repeated to 3 channels, as SD
    encodes masks). A layer's image and mask are neighbouring rows of the VAE's batch, so a batch split over devices
    is encoded where it lies."""
    batch, num_layers, height, width, _ = images.shape
    rows = (batch * num_layers, height, width, 3)
    pixels = interleave_rows(images.reshape(rows), (jnp.repeat(masks, 3, axis=-1) * 2.0 - 1.0).reshape(rows))
    z = vae.apply({"params": params}, pixels, rng, method=AutoencoderKL.encode_latents)
    z = z.reshape(batch, num_layers, 2, *z.shape[1:])
    return jnp.concatenate([z[:, :, 0], z[:, :, 1]], axis=-1)


def _check_nhwc(x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"AutoencoderKL expects NHWC {what} with {channels} channels, got shape {x.shape}")


class AutoencoderKL(nn.Module):
    """SD's VAE. NHWC images in [-1, 1]; every output is float32 whatever the compute `dtype`.

    `__call__` (encode the mean, decode it) exists to initialise every parameter.
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, attention_impl=self.attention_impl, dtype=self.dtype)
        self.decoder = Decoder(cfg, attention_impl=self.attention_impl, dtype=self.dtype)
        self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, dtype=self.dtype, name="quant_conv")
        self.post_quant_conv = layers.conv(cfg.latent_channels, 1, dtype=self.dtype, name="post_quant_conv")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, 3) images -> posterior (mean, logvar), each (B, H/8, W/8, 4) for SD, unscaled."""
        _check_nhwc(images, self.config.in_channels, "images")
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def encode_mean(self, images: jax.Array) -> jax.Array:
        return self.encode(images)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, 4) -> images (B, h*8, w*8, 3), roughly in [-1, 1]."""
        _check_nhwc(latents, self.config.latent_channels, "latents")
        return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)

    def encode_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Images -> latents in diffusion units (times scaling_factor): the mean, or a sample given `rng`."""
        mean, logvar = self.encode(images)
        latents = mean if rng is None else sample_posterior(mean, logvar, rng)
        return latents * self.config.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Latents in diffusion units (as produced by `encode_latents` or a sampler) -> images."""
        return self.decode(latents / self.config.scaling_factor)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode_mean(images))
