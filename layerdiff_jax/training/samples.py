"""Periodic sample grids during training: the current model sampled on prompts from the training data."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from layerdiff_jax.data.tfds_builders import open_data_source, record_to_sample
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.sampling.outputs import write_contact_sheet
from layerdiff_jax.sampling.sampler import LayerDiffPipeline, LayerRequest


def data_requests(data_path: str | os.PathLike, split: str, count: int, max_layers: int) -> list[LayerRequest]:
    """The prompts of the first `count` records of the data with at most `max_layers` layers."""
    source = open_data_source(data_path, split)
    requests = []
    for index in range(len(source)):
        sample = record_to_sample(source[index])
        if 2 <= sample.num_layers <= max_layers:
            background, *foregrounds = sample.layer_prompts
            requests.append(LayerRequest(sample.global_prompt, tuple(foregrounds), background_prompt=background))
        if len(requests) == count:
            break
    return requests


def write_sample_grid(
    path: str | os.PathLike,
    modules: dict[str, Any],
    params: dict[str, Any],
    tokenizer,
    scheduler: SchedulerConfig,
    requests: list[LayerRequest],
    *,
    steps: int,
    guidance: float,
    size: int,
    seed: int,
) -> np.ndarray:
    """Samples `requests` with `params` {"unet", "vae", "text_encoder"} (host arrays), trained with `scheduler`, on
    this process's devices, writes the contact sheet to `path` and returns it as an (H, W, 3) uint8 array."""
    unet = modules["unet"]  # at the size it is being trained at, which the sampler checks `size` against
    unet = unet.clone(unet_config=dataclasses.replace(unet.unet_config, sample_size=size // modules["vae"].config.downsample_factor))
    pipe = LayerDiffPipeline(
        unet, params["unet"], modules["vae"], params["vae"], modules["text_encoder"], params["text_encoder"], tokenizer,
        scheduler=scheduler,
    )
    samples = pipe.generate(requests, steps=steps, guidance=guidance, seed=seed, batch_size=len(requests), size=(size, size), progress=False)
    path = write_contact_sheet(samples, Path(path))
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
