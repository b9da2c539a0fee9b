"""The toy Stable Diffusion used on CPU: the same three components as SD 1.5, a few MB in all.

The demo, the CPU config and the tests run every stage of the SD-1.5 path (VAE, CLIP text encoder, UNet)
at this size. `make_toy_sd` writes a converted SD folder (the layout `convert_weights.py` produces), so
everything downstream loads the toy exactly as it loads real SD-1.5 weights (`training/autoencoder.fit_toy_vae`
fits its VAE on the synthetic world first: SD's VAE comes pretrained, the toy's must learn the images it encodes).

The shipped toy base (`TOY_BASE`) is this architecture pretrained as plain text-to-image
(`configs/toy_sd_pretrain.py`, provenance in its provenance.json).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp

from layerdiff_jax.convert.sd_folder import save_converted
from layerdiff_jax.data.tokenizer import build_toy_tokenizer
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.init import init_params
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig

TEXT_WIDTH = 64
TOY_BASE = Path(__file__).resolve().parent / "assets" / "toy_base"  # the pretrained toy SD folder


def toy_configs(vocab_size: int) -> dict[str, object]:
    """SD-1.x architectures at toy size: a 4x VAE (64x64 images -> 16x16x4 latents; SD's is 8x, but at 64x64 an
    8x latent leaves the synthetic shapes a few latent pixels, too few for their outline), a 2-layer CLIP, a
    2-level UNet with its transformers (and so LayerDiff's layer blocks) at the 8x8 level: at 16x16 their
    attention would be about half the FLOPs of a LayerDiff training step."""
    return {
        "unet": UNetConfig(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            num_attention_heads=4,
            cross_attention_dim=TEXT_WIDTH,
            norm_num_groups=8,
        ),
        "vae": VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4),
        "text_encoder": CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        ),
    }


def make_toy_sd(
    output_dir: str | Path,
    *,
    seed: int = 0,
    params: Mapping[str, Mapping] | None = None,
    vae_scaling_factor: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a toy SD folder with the toy tokenizer; components are random unless `params` gives them
    (e.g. {"vae": fitted_vae_params}, with the `vae_scaling_factor` measured for it)."""
    output_dir = Path(output_dir)
    tokenizer = build_toy_tokenizer()
    configs = toy_configs(tokenizer.vocab_size)
    if vae_scaling_factor is not None:
        configs["vae"] = dataclasses.replace(configs["vae"], scaling_factor=vae_scaling_factor)
    unet = UNet2DConditionModel(configs["unet"])
    vae = AutoencoderKL(configs["vae"])
    text = CLIPTextTransformer(configs["text_encoder"])
    keys = jax.random.split(jax.random.key(seed), 3)
    params = dict(params or {})
    examples = {
        "unet": (unet, (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, TEXT_WIDTH)))),
        "vae": (vae, (jnp.zeros((1, 16, 16, 3)),)),
        "text_encoder": (text, (jnp.zeros((1, 77), jnp.int32),)),
    }
    components = {
        name: (module, params[name] if name in params else init_params(module, key, *example))
        for key, (name, (module, example)) in zip(keys, examples.items())
    }
    with tempfile.TemporaryDirectory() as staging:  # save_converted copies a tokenizer folder
        tokenizer.save(staging)
        save_converted(output_dir, components, source="toy", tokenizer_dir=staging, overwrite=overwrite)
    return output_dir

