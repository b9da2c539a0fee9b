"""Stable Diffusion 1.x's UNet2DConditionModel in Flax (linen), NHWC, driven by diffusers' config.

The parameter tree is diffusers' module tree with list indices joined by "_" (torch
`down_blocks.0.attentions.1.proj_in` is `down_blocks_0/attentions_1/proj_in`), so the torch weights load
by a plain rename. The model is built in `setup()` and exposed in pieces (`conv_in`, `time_embed`,
`body`, `head`, `conv_out`) so the LayerDiff model can run it with its own input/output convolutions, and
`layer_block` inserts a module after every spatial transformer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from layerdiff_jax.models import layers
from layerdiff_jax.models.config_types import check_field_types
from layerdiff_jax.models.unet_blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_sinusoid,
)

Dtype = Any

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"

# diffusers config fields that SD-1.x leaves at these values; any other value is an architecture we don't build.
_FIXED_DIFFUSERS_FIELDS: dict[str, tuple[Any, ...]] = {
    "mid_block_type": (MID_BLOCK,),
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),
    "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "use_linear_projection": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "upcast_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}
# Fields that have no effect with the fixed values above (addition_embed_type is None).
_INERT_DIFFUSERS_FIELDS = ("addition_embed_type_num_heads",)


def _per_block(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"UNetConfig.{name} must be an int or {n} ints (one per block), got {value!r}")
    return value


def _compact(values: tuple[int, ...]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers UNet2DConditionModel fields SD-1.x uses; defaults are diffusers' defaults.

    `num_attention_heads` is the number of heads per down block (mirrored for the up blocks, the last one
    for the mid block); diffusers' SD-1.x configs store it under the legacy name `attention_head_dim`.
    Per-block fields accept an int for all blocks and are normalised to tuples.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    layers_per_block: int | tuple[int, ...] = 2
    num_attention_heads: int | tuple[int, ...] = 8
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int = 1280
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int | tuple[int, int] | None = None  # bookkeeping only (the training resolution / 8)

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)  # the dataclass is frozen
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            set_(name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNetConfig needs one down and one up block type per entry of block_out_channels ({n}), got "
                f"{len(self.down_block_types)} down and {len(self.up_block_types)} up"
            )
        for name, allowed in (("down_block_types", (CROSS_ATTN_DOWN, PLAIN_DOWN)), ("up_block_types", (CROSS_ATTN_UP, PLAIN_UP))):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise ValueError(f"UNetConfig.{name}: unsupported block type(s) {bad}; SD-1.x blocks are {allowed}")
        for name in ("layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
            set_(name, _per_block(name, getattr(self, name), n))
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"UNetConfig.norm_num_groups must be an int (SD-1.x has GroupNorms), got {self.norm_num_groups!r}")
        if isinstance(self.sample_size, list):
            set_("sample_size", tuple(self.sample_size))
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"UNetConfig: block width {channels} is not divisible by norm_num_groups={self.norm_num_groups}")
        for channels, heads in [(b.out_channels, b.num_heads) for b in self.block_layouts() if b.num_heads]:
            if channels % heads:
                raise ValueError(f"UNetConfig: block width {channels} is not divisible by its {heads} attention heads")

    def block_layouts(self) -> list["BlockLayout"]:
        """Down blocks, the mid block, then up blocks, as diffusers lays them out (up blocks mirror the down blocks)."""
        n = len(self.block_out_channels)
        down = [
            BlockLayout("down", self.block_out_channels[i], self.layers_per_block[i],
                        self.num_attention_heads[i] if kind == CROSS_ATTN_DOWN else None,
                        self.transformer_layers_per_block[i], resample=i < n - 1)
            for i, kind in enumerate(self.down_block_types)
        ]
        mid = BlockLayout("mid", self.block_out_channels[-1], 1, self.num_attention_heads[-1],
                          self.transformer_layers_per_block[-1], resample=False)
        # Up block i mirrors down block n-1-i, with one more resnet (for the skip from its downsampler).
        up = [
            BlockLayout("up", self.block_out_channels[j], self.layers_per_block[j] + 1,
                        self.num_attention_heads[j] if kind == CROSS_ATTN_UP else None,
                        self.transformer_layers_per_block[j], resample=i < n - 1)
            for i, kind in enumerate(self.up_block_types)
            for j in [n - 1 - i]
        ]
        return down + [mid] + up

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """Stable Diffusion 1.5's UNet (859,520,964 parameters)."""
        return cls(cross_attention_dim=768, sample_size=64)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """From a diffusers `unet/config.json` dict; a field we don't build raises ValueError naming it."""
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in _INERT_DIFFUSERS_FIELDS}
        for key, allowed in _FIXED_DIFFUSERS_FIELDS.items():
            value = config.pop(key, allowed[0])
            values = value if isinstance(value, (list, tuple)) and key == "only_cross_attention" else [value]
            if any(v not in allowed for v in values):
                raise ValueError(f"unsupported UNet config: {key}={value!r} (only {allowed[0]!r} is implemented)")
        heads = config.pop("num_attention_heads", None)
        legacy_heads = config.pop("attention_head_dim", 8)  # SD-1.x's name for the number of heads
        config["num_attention_heads"] = legacy_heads if heads is None else heads
        cross = config.get("cross_attention_dim")
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise ValueError(f"unsupported UNet config: per-block cross_attention_dim={cross!r}")
            config["cross_attention_dim"] = cross[0]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unsupported UNet config field(s): {', '.join(unknown)}")
        check_field_types(cls, config)
        return cls(**config)  # __post_init__ turns JSON lists into tuples

    def to_diffusers_config(self) -> dict[str, Any]:
        """A diffusers `UNet2DConditionModel` config.json dict describing exactly this UNet."""
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "layers_per_block": _compact(self.layers_per_block),
            "attention_head_dim": _compact(self.num_attention_heads),
            "transformer_layers_per_block": _compact(self.transformer_layers_per_block),
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            **{key: allowed[0] for key, allowed in _FIXED_DIFFUSERS_FIELDS.items()},
        }


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """One UNet block's shape: `num_heads` None means no spatial transformers; `resample` = down/upsampler."""

    kind: str  # "down" | "mid" | "up"
    out_channels: int
    num_layers: int
    num_heads: int | None
    transformer_layers: int
    resample: bool


def broadcast_timesteps(timesteps, batch: int) -> jax.Array:
    """A scalar, (1,) or (batch,) int/float timestep input -> shape (batch,)."""
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim > 1 or timesteps.size not in (1, batch):
        raise ValueError(f"timesteps must be a scalar or of shape ({batch},), got {timesteps.shape}")
    return jnp.broadcast_to(timesteps.reshape(-1), (batch,))


_RematResnetBlock2D = nn.remat(ResnetBlock2D)
_RematTransformer2DModel = nn.remat(Transformer2DModel)


def _constrain(h: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(h, ("batch", "height", "width", "embed"))


class _Block(nn.Module):
    """What the down, mid and up blocks share: their resnets, and spatial transformers (each optionally
    followed by the `layer_block` hook, which receives `layer_inputs` untouched)."""

    layout: BlockLayout
    norm_num_groups: int
    norm_eps: float
    attention_impl: str = "auto"
    remat: bool = False
    layer_block: Callable[..., nn.Module] | None = None
    dtype: Dtype = jnp.float32

    def resnet(self, i: int, h, emb):
        cls = _RematResnetBlock2D if self.remat else ResnetBlock2D
        block = cls(self.layout.out_channels, self.norm_num_groups, self.norm_eps, dtype=self.dtype, name=f"resnets_{i}")
        return _constrain(block(h, emb))

    def attention(self, i: int, h, context, layer_inputs):
        cls = _RematTransformer2DModel if self.remat else Transformer2DModel
        h = cls(
            self.layout.num_heads,
            self.norm_num_groups,
            self.layout.transformer_layers,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name=f"attentions_{i}",
        )(h, context)
        if self.layer_block is not None:
            layer_attn = self.layer_block(channels=self.layout.out_channels, num_heads=self.layout.num_heads, name=f"layer_attentions_{i}")
            h = layer_attn(h, layer_inputs)
        return _constrain(h)


class DownBlock(_Block):
    """CrossAttnDownBlock2D (num_heads set) or DownBlock2D; returns (h, skip activations for the up path)."""

    @nn.compact
    def __call__(self, h, emb, context, layer_inputs=None):
        skips = []
        for i in range(self.layout.num_layers):
            h = self.resnet(i, h, emb)
            if self.layout.num_heads:
                h = self.attention(i, h, context, layer_inputs)
            skips.append(h)
        if self.layout.resample:
            h = _constrain(Downsample2D(self.layout.out_channels, dtype=self.dtype, name="downsamplers_0")(h))
            skips.append(h)
        return h, tuple(skips)


class MidBlock(_Block):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) per layer."""

    @nn.compact
    def __call__(self, h, emb, context, layer_inputs=None):
        h = self.resnet(0, h, emb)
        for i in range(self.layout.num_layers):
            h = self.attention(i, h, context, layer_inputs)
            h = self.resnet(i + 1, h, emb)
        return h


class UpBlock(_Block):
    """CrossAttnUpBlock2D (num_heads set) or UpBlock2D; consumes `skips` from the last, upsamples to `upsample_size`."""

    @nn.compact
    def __call__(self, h, skips, emb, context, layer_inputs=None, upsample_size=None):
        for i in range(self.layout.num_layers):
            h = self.resnet(i, jnp.concatenate([h, skips[-1 - i]], axis=-1), emb)
            if self.layout.num_heads:
                h = self.attention(i, h, context, layer_inputs)
        if self.layout.resample:
            h = _constrain(Upsample2D(self.layout.out_channels, dtype=self.dtype, name="upsamplers_0")(h, upsample_size))
        return h


class UNet2DConditionModel(nn.Module):
    """eps = unet.apply({"params": p}, latents (B,H,W,C), timesteps (B,) or scalar, context (B,T,D)) -> (B,H,W,C_out).

    Pieces for an outer model: `conv_in`, `time_embed(timesteps)`, `body(h, emb, context, layer_inputs)`,
    `head(h)` (conv_norm_out + SiLU), `conv_out`. Any latent size works (odd sizes upsample to the skip's size,
    like diffusers). With `layer_block=None` the parameter tree is exactly diffusers'.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False  # rematerialise resnets and spatial transformers in the backward pass
    # Called as layer_block(channels=C, num_heads=H, name="layer_attentions_i") after every spatial
    # transformer `attentions_i`, then applied as h = module(h, layer_inputs).
    layer_block: Callable[..., nn.Module] | None = None

    def setup(self):
        c = self.config
        common = dict(
            norm_num_groups=c.norm_num_groups,
            norm_eps=c.norm_eps,
            attention_impl=self.attention_impl,
            remat=self.remat,
            layer_block=self.layer_block,
            dtype=self.dtype,
        )
        layouts = c.block_layouts()
        n = len(c.block_out_channels)
        self.conv_in = layers.conv(c.block_out_channels[0], 3, dtype=self.dtype, name="conv_in")
        self.time_embedding = TimestepEmbedding(4 * c.block_out_channels[0], dtype=self.dtype)
        self.down_blocks = [DownBlock(layout, **common) for layout in layouts[:n]]
        self.mid_block = MidBlock(layouts[n], **common)
        self.up_blocks = [UpBlock(layout, **common) for layout in layouts[n + 1 :]]
        self.conv_norm_out = layers.group_norm(
            c.norm_num_groups, c.norm_eps, dtype=self.dtype, silu=True, name="conv_norm_out"
        )
        self.conv_out = layers.conv(c.out_channels, 3, dtype=self.dtype, name="conv_out")

    def time_embed(self, timesteps: jax.Array) -> jax.Array:
        """(N,) int or float timesteps -> (N, 4 * block_out_channels[0]) embedding."""
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim != 1:
            raise ValueError(f"time_embed expects timesteps of shape (N,), got {timesteps.shape}")
        c = self.config
        sinusoid = timestep_sinusoid(timesteps, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        return self.time_embedding(sinusoid.astype(self.dtype))

    def body(self, h: jax.Array, emb: jax.Array, context: jax.Array, layer_inputs: Any = None) -> jax.Array:
        """Down blocks (keeping skips), mid block, up blocks. `h` is conv_in's output; returns block_out_channels[0] wide."""
        h = _constrain(h)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, layer_inputs)
            skips.extend(block_skips)
        h = _constrain(self.mid_block(h, emb, context, layer_inputs))
        for block in self.up_blocks:
            n = block.layout.num_layers
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[1:3] if block.layout.resample else None
            h = block(h, block_skips, emb, context, layer_inputs, upsample_size)
        return h

    def head(self, h: jax.Array) -> jax.Array:
        """conv_norm_out + SiLU: the features conv_out reads."""
        return self.conv_norm_out(h)

    def __call__(self, latents, timesteps, context, layer_inputs: Any = None):
        latents, context = jnp.asarray(latents), jnp.asarray(context)
        c = self.config
        if latents.ndim != 4 or latents.shape[-1] != c.in_channels:
            raise ValueError(f"latents must be NHWC (B, H, W, {c.in_channels}), got {latents.shape}")
        batch = latents.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != c.cross_attention_dim:
            raise ValueError(f"context must be (B={batch}, T, {c.cross_attention_dim}), got {context.shape}")
        emb = self.time_embed(broadcast_timesteps(timesteps, batch))
        h = self.body(self.conv_in(latents), emb, context, layer_inputs=layer_inputs)
        return self.conv_out(self.head(h))
