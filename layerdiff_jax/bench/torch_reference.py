"""The PyTorch side of the benchmark: diffusers/transformers models with random weights, built offline.

The JAX side loads exactly these weights (converted from the torch state dict, or from the folder the
torch pipeline is saved to), so both sides run the same network with the same numbers.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel

from layerdiff_jax.data.tokenizer import PromptTokenizer
from layerdiff_jax.models.clip_text import CLIPTextConfig
from layerdiff_jax.models.unet import UNetConfig
from layerdiff_jax.models.vae import VAEConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_device(device: str) -> torch.device:
    """"cpu" or "gpu" (CUDA); a clear error when this torch build has no CUDA."""
    if device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("--device gpu needs a CUDA build of torch for the reference side; this torch has no CUDA")
        return torch.device("cuda")
    return torch.device("cpu")


def set_cpu_threads(threads: int | None = None) -> int:
    """torch's intra-op threads = the cores XLA's CPU client uses (all of them), for a like-for-like comparison."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels dispatch to on this machine."""
    return torch.backends.cpu.get_cpu_capability()


def build_unet(config: UNetConfig, seed: int) -> TorchUNet:
    torch.manual_seed(seed)
    return TorchUNet.from_config(config.to_diffusers_config()).eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().float().cpu().numpy() for key, value in model.state_dict().items()}


def ddim_scheduler() -> DDIMScheduler:
    """SD-1.5's scheduler config (scaled-linear betas, "leading" spacing, steps_offset 1)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_sd_pipeline(
    configs: Mapping[str, Any], tokenizer: PromptTokenizer, seed: int, unet: TorchUNet | None = None
) -> StableDiffusionPipeline:
    """A diffusers StableDiffusionPipeline, float32 on CPU, from random components of the given architectures
    (`unet`, if given, instead of a new one: a full-size UNet is 3.4 GB)."""
    unet_config: UNetConfig = configs["unet"]
    vae_config: VAEConfig = configs["vae"]
    text_config: CLIPTextConfig = configs["text_encoder"]
    torch.manual_seed(seed)
    if unet is None:
        unet = TorchUNet.from_config(unet_config.to_diffusers_config())
    vae = TorchAutoencoderKL.from_config(vae_config.to_diffusers_config())
    hf = tokenizer.hf_tokenizer
    text_encoder = CLIPTextModel(
        TorchCLIPTextConfig(
            vocab_size=text_config.vocab_size,
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_hidden_layers=text_config.num_hidden_layers,
            num_attention_heads=text_config.num_attention_heads,
            max_position_embeddings=text_config.max_position_embeddings,
            hidden_act=text_config.hidden_act,
            layer_norm_eps=text_config.layer_norm_eps,
            pad_token_id=hf.pad_token_id,
            bos_token_id=hf.bos_token_id,
            eos_token_id=hf.eos_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=hf,
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_device(module, device: torch.device, dtype: str):
    """A torch module or diffusers pipeline on `device` in `dtype` (no cast when it is already float32)."""
    module = module.to(device)
    return module if dtype == "float32" else module.to(dtype=TORCH_DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
