"""Plain text-to-image latent diffusion, as Stable Diffusion is pretrained: the model the toy base is.

`TextToImageModel` holds the CLIP text encoder and the SD UNet2DConditionModel as one module, so pretraining
can train both (the toy base's text encoder learns its words jointly with the UNet, as SD's CLIP was itself
pretrained) with one parameter tree, {"text_encoder": ..., "unet": ...}, that the converter's SD folder
layout stores as two components. No LayerDiff modules, no masks, no layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig


class TextToImageModel(nn.Module):
    """eps = apply(latents (B,h,w,C), timesteps (B,), token ids (B,T)) -> (B,h,w,C)."""

    unet_config: UNetConfig
    text_config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    def setup(self):
        if self.text_config.hidden_size != self.unet_config.cross_attention_dim:
            raise ValueError(
                f"the text encoder is {self.text_config.hidden_size} wide but the UNet attends to "
                f"{self.unet_config.cross_attention_dim}-wide context"
            )
        self.text_encoder = CLIPTextTransformer(self.text_config, dtype=self.dtype, attention_impl=self.attention_impl)
        self.unet = UNet2DConditionModel(self.unet_config, dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat)

    def __call__(self, latents: jax.Array, timesteps: jax.Array, input_ids: jax.Array) -> jax.Array:
        return self.unet(latents, timesteps, self.text_encoder(input_ids))

    def example_inputs(self, context_length: int = 77):
        """Smallest inputs `init` accepts (for building the parameter tree without real data)."""
        u = self.unet_config
        size = 2 ** (len(u.block_out_channels) - 1)
        return (
            jnp.zeros((1, size, size, u.in_channels)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, min(context_length, self.text_config.max_position_embeddings)), jnp.int32),
        )
