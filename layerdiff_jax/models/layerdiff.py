"""The LayerDiff UNet: SD-1.5's UNet run over a layer axis, with layer-collaborative attention.

Input per sample is (L, h, w, 8): image latent ++ mask latent for every layer (layer 0 = background).
The SD body runs on all layers at once with the layer axis folded into the batch; after every SD spatial
transformer a `LayerCollaborativeBlock` mixes information across layers (inter-layer attention) and
steers each layer by its own prompt (text-guided intra-layer attention). Layer prompts are first
enhanced with the global prompt by the `LayerPromptEnhancer`. Every new module's last linear starts at
zero and the mask gate at 0, so a model fresh from `init_from_sd` reproduces SD on each layer's image.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.models import layers
from layerdiff_jax.models.attention import Attention
from layerdiff_jax.models.init import abstract_params, init_params
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from layerdiff_jax.models.unet_blocks import TRANSFORMER_LAYER_NORM_EPS, FeedForward

Dtype = Any

PROMPT_ENHANCER_VARIANTS = ("none", "s", "s+c", "s+c+f")


@dataclasses.dataclass(frozen=True)
class LayerDiffConfig:
    """What LayerDiff adds to SD's UNet. The defaults are the paper's model."""

    max_layers: int = 4  # background + up to 3 foregrounds in the paper's data; any L <= max_layers works
    # Layer-specific prompt enhancer: "none", "s" (self-attention across layer prompts),
    # "s+c" (+ cross-attention to the global prompt; the paper's best), "s+c+f" (+ a feed-forward).
    prompt_enhancer: str = "s+c"
    enhancer_heads: int = 8
    use_layer_prompts: bool = True  # False: the paper's first ablation row (no intra-layer text attention)
    # A learned, zero-initialised embedding of the layer index added to the time embedding. Off in the
    # paper: without it the model is equivariant to permuting foreground layers with their prompts.
    layer_order_embedding: bool = False

    def __post_init__(self):
        if self.prompt_enhancer not in PROMPT_ENHANCER_VARIANTS:
            raise ValueError(f"LayerDiffConfig.prompt_enhancer must be one of {PROMPT_ENHANCER_VARIANTS}, got {self.prompt_enhancer!r}")
        if self.max_layers < 1:
            raise ValueError(f"LayerDiffConfig.max_layers must be >= 1, got {self.max_layers}")
        if self.enhancer_heads < 1:
            raise ValueError(f"LayerDiffConfig.enhancer_heads must be >= 1, got {self.enhancer_heads}")


def _norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    return layers.layer_norm(TRANSFORMER_LAYER_NORM_EPS, dtype=dtype, name=name)


def _key_mask(layer_valid: jax.Array) -> jax.Array:
    """(B, L) validity -> a (B, 1, 1, L) attention mask: padded layers are never attended to."""
    return layer_valid[:, None, None, :]


class LayerCollaborativeBlock(nn.Module):
    """Inter-layer attention, text-guided intra-layer attention, GEGLU FFN; pre-norm, residual.

    Runs on the folded (B*L, H, W, C) activations of the SD body. `layer_inputs` carries
    `valid` (B, L) and `context` (B*L, T, D), the enhanced prompt of each layer (None without layer prompts).
    """

    channels: int
    num_heads: int
    use_layer_prompts: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, layer_inputs):
        valid = layer_inputs["valid"]
        batch, num_layers = valid.shape
        folded, height, width, channels = h.shape
        head_dim = channels // self.num_heads

        def attention(name):
            return Attention(self.num_heads, head_dim, zero_init_out=True, attention_impl=self.attention_impl, dtype=self.dtype, name=name)

        # 1. Inter-layer attention: at each spatial position, the L layers' tokens attend to each other.
        x = _norm("norm_inter", self.dtype)(h).reshape(batch, num_layers, height * width, channels)
        tokens = x.transpose(0, 2, 1, 3).reshape(batch * height * width, num_layers, channels)
        mask = jnp.repeat(_key_mask(valid), height * width, axis=0)
        mixed = attention("inter_attn")(tokens, mask=mask)
        mixed = mixed.reshape(batch, height * width, num_layers, channels).transpose(0, 2, 1, 3)
        h = h + mixed.reshape(folded, height, width, channels)

        tokens = h.reshape(folded, height * width, channels)
        # 2. Text-guided intra-layer attention: each layer's tokens attend to that layer's own prompt.
        if self.use_layer_prompts:
            tokens = tokens + attention("intra_attn")(_norm("norm_intra", self.dtype)(tokens), layer_inputs["context"])
        # 3. Feed-forward.
        tokens = tokens + FeedForward(zero_init_out=True, dtype=self.dtype, name="ff")(_norm("norm_ff", self.dtype)(tokens))
        return tokens.reshape(folded, height, width, channels)


class LayerPromptEnhancer(nn.Module):
    """Enriches each layer prompt with the other layers' prompts and the global prompt.

    S: self-attention over all layers' prompt tokens together; C: cross-attention from layer-prompt
    tokens to the global prompt; F: a GEGLU FFN. Each pre-norm, residual, last linear zero-initialised.
    """

    variant: str = "s+c"
    num_heads: int = 8
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, layer_context, global_context, layer_valid):
        batch, num_layers, length, width = layer_context.shape
        if width % self.num_heads:
            raise ValueError(f"prompt enhancer: text width {width} is not divisible by enhancer_heads={self.num_heads}")

        def attention(name):
            return Attention(self.num_heads, width // self.num_heads, zero_init_out=True, attention_impl=self.attention_impl, dtype=self.dtype, name=name)

        x = layers.constrain_tokens(layer_context.reshape(batch, num_layers * length, width))
        parts = self.variant.split("+")
        if "s" in parts:
            mask = jnp.repeat(layer_valid, length, axis=1)[:, None, None, :]
            x = layers.constrain_tokens(x + attention("self_attn")(_norm("norm_self", self.dtype)(x), mask=mask))
        if "c" in parts:
            x = layers.constrain_tokens(x + attention("cross_attn")(_norm("norm_cross", self.dtype)(x), global_context))
        if "f" in parts:
            x = layers.constrain_tokens(x + FeedForward(zero_init_out=True, dtype=self.dtype, name="ff")(_norm("norm_ff", self.dtype)(x)))
        return x.reshape(batch, num_layers, length, width)


class LayerDiffUNet(nn.Module):
    """eps = apply(latents (B,L,h,w,8), timesteps (B,L), global_context (B,T,D), layer_context (B,L,T,D),
    layer_valid (B,L) bool) -> (B,L,h,w,8): image-latent noise ++ mask-latent noise per layer."""

    unet_config: UNetConfig
    config: LayerDiffConfig = LayerDiffConfig()
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    def setup(self):
        c, u = self.config, self.unet_config
        block = functools.partial(
            LayerCollaborativeBlock, use_layer_prompts=c.use_layer_prompts, attention_impl=self.attention_impl, dtype=self.dtype
        )
        self.unet = UNet2DConditionModel(u, dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat, layer_block=block)
        self.conv_in_mask = layers.conv(u.block_out_channels[0], 3, dtype=self.dtype, name="conv_in_mask")
        self.conv_out_mask = layers.conv(u.out_channels, 3, dtype=self.dtype, name="conv_out_mask")
        self.mask_gate = self.param("mask_gate", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), ())
        if c.use_layer_prompts and c.prompt_enhancer != "none":
            self.prompt_enhancer = LayerPromptEnhancer(c.prompt_enhancer, c.enhancer_heads, attention_impl=self.attention_impl, dtype=self.dtype)
        if c.layer_order_embedding:
            self.layer_order = self.param(
                "layer_order",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("layers", "embed")),
                (c.max_layers, 4 * u.block_out_channels[0]),
            )

    def _check_inputs(self, latents, timesteps, global_context, layer_context, layer_valid):
        u, c = self.unet_config, self.config
        if latents.ndim != 5 or latents.shape[-1] != 2 * u.in_channels:
            raise ValueError(f"latents must be (B, L, h, w, {2 * u.in_channels}) (image ++ mask latents), got {latents.shape}")
        batch, num_layers = latents.shape[:2]
        if not 1 <= num_layers <= c.max_layers:
            raise ValueError(f"got {num_layers} layers; this model supports 1 to max_layers={c.max_layers}")
        expected = {
            "timesteps": (timesteps.shape, (batch, num_layers)),
            "layer_valid": (layer_valid.shape, (batch, num_layers)),
        }
        for name, (got, want) in expected.items():
            if tuple(got) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(got)}")
        if global_context.ndim != 3 or global_context.shape[0] != batch or global_context.shape[-1] != u.cross_attention_dim:
            raise ValueError(f"global_context must be (B={batch}, T, {u.cross_attention_dim}), got {global_context.shape}")
        if c.use_layer_prompts and (
            layer_context.ndim != 4 or layer_context.shape[:2] != (batch, num_layers) or layer_context.shape[-1] != u.cross_attention_dim
        ):
            raise ValueError(f"layer_context must be (B={batch}, L={num_layers}, T, {u.cross_attention_dim}), got {layer_context.shape}")

    def __call__(self, latents, timesteps, global_context, layer_context, layer_valid):
        latents, timesteps = jnp.asarray(latents), jnp.asarray(timesteps)
        global_context, layer_valid = jnp.asarray(global_context), jnp.asarray(layer_valid, bool)
        layer_context = None if layer_context is None else jnp.asarray(layer_context)
        self._check_inputs(latents, timesteps, global_context, layer_context, layer_valid)
        global_context = layers.constrain_tokens(global_context)
        layer_context = None if layer_context is None else layers.constrain_tokens(layer_context)
        batch, num_layers, height, width, _ = latents.shape
        fold = lambda x: x.reshape(batch * num_layers, *x.shape[2:])  # noqa: E731  (B, L, ...) -> (B*L, ...)
        per_layer = lambda x: jnp.repeat(x, num_layers, axis=0)  # noqa: E731  (B, ...) -> (B*L, ...)

        x = fold(latents)
        image, mask = jnp.split(x, 2, axis=-1)
        emb = self.unet.time_embed(fold(timesteps))
        if self.config.layer_order_embedding:
            emb = emb + jnp.tile(self.layer_order[:num_layers], (batch, 1)).astype(emb.dtype)
        h = self.unet.conv_in(image) + self.mask_gate.astype(self.dtype) * self.conv_in_mask(mask)

        layer_inputs = {"valid": layer_valid, "context": None}
        if self.config.use_layer_prompts:
            if self.config.prompt_enhancer != "none":
                layer_context = self.prompt_enhancer(layer_context, global_context, layer_valid)
            layer_inputs["context"] = fold(layer_context)
        h = self.unet.body(h, emb, per_layer(global_context), layer_inputs)
        features = self.unet.head(h)
        eps = jnp.concatenate([self.unet.conv_out(features), self.conv_out_mask(features)], axis=-1)
        return eps.reshape(batch, num_layers, height, width, -1)

    def example_inputs(self, num_layers: int = 2, context_length: int = 77):
        """Smallest inputs `init` accepts (for building the parameter tree without real data)."""
        u = self.unet_config
        size = 2 ** (len(u.block_out_channels) - 1)
        return (
            jnp.zeros((1, num_layers, size, size, 2 * u.in_channels)),
            jnp.zeros((1, num_layers), jnp.int32),
            jnp.zeros((1, context_length, u.cross_attention_dim)),
            jnp.zeros((1, num_layers, context_length, u.cross_attention_dim)),
            jnp.ones((1, num_layers), bool),
        )


def init_from_sd(unet_module: UNet2DConditionModel, unet_params, config: LayerDiffConfig, rng: jax.Array):
    """A LayerDiff model initialised from SD-1.5 UNet parameters as the paper's appendix says.

    SD's parameters are copied unchanged; conv_in_mask/conv_out_mask are copies of SD's conv_in/conv_out;
    each intra-layer attention's q/k/v are copies of its block's SD cross-attention (attn2); the inter-layer
    attention and the prompt enhancer are random; every new last linear is zero and the mask gate is 0.
    Returns (model, params) with params a plain float32 pytree.
    """
    model = LayerDiffUNet(
        unet_module.config, config, dtype=unet_module.dtype, attention_impl=unet_module.attention_impl, remat=unet_module.remat
    )
    is_sd = lambda path: path[0] == "unet" and not any(name.startswith("layer_attentions_") for name in path)  # noqa: E731
    shapes = flax.traverse_util.flatten_dict(abstract_params(model, *model.example_inputs()))
    # Only the new parameters are drawn: SD's are copied over anyway.
    params = init_params(model, rng, *model.example_inputs(), keep=lambda path: not is_sd(path))
    sd = flax.traverse_util.flatten_dict(dict(unet_params))
    for key, value in sd.items():
        target = ("unet", *key)
        if target not in shapes:
            raise ValueError(f"SD UNet parameter {'/'.join(key)} has no place in the LayerDiff model (is it an SD-1.x UNet?)")
        if tuple(shapes[target].shape) != tuple(np.shape(value)):
            raise ValueError(f"SD UNet parameter {'/'.join(key)} has shape {np.shape(value)}, LayerDiff expects {shapes[target].shape}")
        params[target] = value
    missing = [k for k in shapes if is_sd(k) and k[1:] not in sd]
    if missing:
        raise ValueError(f"SD UNet parameters missing: {', '.join('/'.join(k[1:]) for k in missing[:10])}")
    for leaf in ("kernel", "bias"):
        params[("conv_in_mask", leaf)] = sd[("conv_in", leaf)]
        params[("conv_out_mask", leaf)] = sd[("conv_out", leaf)]
    for key in list(params):
        # .../layer_attentions_i/intra_attn/to_{q,k,v}/kernel <- .../attentions_i/transformer_blocks_0/attn2/to_{q,k,v}/kernel
        if "intra_attn" in key and key[-2] in ("to_q", "to_k", "to_v"):
            i = key.index("intra_attn")
            block = key[i - 1].replace("layer_attentions_", "attentions_")
            params[key] = sd[(*key[1 : i - 1], block, "transformer_blocks_0", "attn2", *key[-2:])]
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), flax.traverse_util.unflatten_dict(params))
    return model, params
