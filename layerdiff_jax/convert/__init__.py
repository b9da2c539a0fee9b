"""PyTorch Stable Diffusion weights -> Flax parameters, and the folders the library reads.

    from layerdiff_jax.convert import load_unet, load_vae, load_text_encoder
    unet, unet_params = load_unet("sd/unet")   # a diffusers component folder, or one written by convert_weights.py
"""

from layerdiff_jax.convert.clip_text import load_text_encoder
from layerdiff_jax.convert.core import ConversionError
from layerdiff_jax.convert.sd_folder import load_sd
from layerdiff_jax.convert.unet import load_unet
from layerdiff_jax.convert.vae import load_vae

__all__ = ["ConversionError", "load_sd", "load_text_encoder", "load_unet", "load_vae"]
