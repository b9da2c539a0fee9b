"""The batch sampler's programs compiled for a TPU slice or GPU node ahead of time, without weights.

  python scripts/compile_aot.py sample --slice v5e-256 --size 512 --layers 4 --steps 50 --find-max-batch

The programs are the ones `sampling.sampler.LayerDiffPipeline` runs for every batch: guided DDIM with layer-aware
negative prompts (`denoise_program`, one `lax.scan` over the steps) and the VAE decode (`decode_program`), with the
shardings the pipeline gives them on a data-parallel mesh over every chip (parameters replicated, samples split).
Parameters are ShapeDtypeStructs of the modules' shapes (float32, as the pipeline loads them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from layerdiff_jax.aot.analysis import CompiledProgram, compile_program
from layerdiff_jax.aot.slices import Slice, SliceError, slice_devices
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.mesh import data_parallel_mesh
from layerdiff_jax.models.backend import tracing_for
from layerdiff_jax.models.clip_text import CLIPTextTransformer
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet
from layerdiff_jax.models.vae import AutoencoderKL
from layerdiff_jax.sampling.sampler import decode_program, denoise_arguments, denoise_program
from layerdiff_jax.sharding import MESH_AXES
from layerdiff_jax.training.program import ModelConfigs


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    size: int  # image side in pixels
    layers: int  # background + foregrounds
    steps: int  # DDIM steps, guidance on
    dtype: str  # the modules' compute dtype
    attention_impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class SampleCompiler:
    """Compiles the denoise and decode programs of a LayerDiff model on slice `s` for any batch per chip."""

    slice: Slice
    settings: SampleSettings
    unet: LayerDiffUNet
    vae: AutoencoderKL
    text_encoder: CLIPTextTransformer
    scheduler: SchedulerConfig
    mesh: Mesh

    @classmethod
    def create(
        cls, s: Slice, models: ModelConfigs, layerdiff: LayerDiffConfig, scheduler: SchedulerConfig, settings: SampleSettings
    ) -> "SampleCompiler":
        """SliceError for settings the model cannot sample (checked before any compile)."""
        multiple = models.vae.downsample_factor * 2 ** (len(models.unet.block_out_channels) - 1)
        if settings.size < multiple or settings.size % multiple:
            raise SliceError(f"--size {settings.size} must be a positive multiple of {multiple} for this VAE and UNet")
        if not 2 <= settings.layers <= layerdiff.max_layers:
            raise SliceError(f"--layers {settings.layers} must be in [2, max_layers={layerdiff.max_layers}] (a background and 1+ foregrounds)")
        if not 1 <= settings.steps <= scheduler.num_train_timesteps:
            raise SliceError(f"--steps {settings.steps} must be in [1, {scheduler.num_train_timesteps}]")
        dtype, impl = jnp.dtype(settings.dtype), settings.attention_impl
        devices = slice_devices(s.name)
        # The pipeline runs one device without a mesh; a one-device mesh compiles the same program for the chip.
        mesh = data_parallel_mesh(devices) or Mesh(np.asarray(devices).reshape(1, 1, 1), MESH_AXES)
        return cls(
            s, settings, LayerDiffUNet(models.unet, layerdiff, dtype=dtype, attention_impl=impl),
            AutoencoderKL(models.vae, dtype=dtype, attention_impl=impl),
            CLIPTextTransformer(models.text_encoder, dtype=dtype, attention_impl=impl), scheduler, mesh,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        side = self.settings.size // self.vae.config.downsample_factor
        return self.settings.layers, side, side, 2 * self.vae.config.latent_channels

    def params(self) -> dict:
        """The pipeline's parameter tree {"unet", "vae", "text"} as ShapeDtypeStructs."""
        factor, tokens = self.vae.config.downsample_factor, self.text_encoder.config.max_position_embeddings
        return {
            "unet": abstract_params(self.unet, *self.unet.example_inputs()),
            "vae": abstract_params(self.vae, jnp.zeros((1, factor, factor, 3))),
            "text": abstract_params(self.text_encoder, jnp.zeros((1, tokens), jnp.int32)),
        }

    def compile(self, batch_per_chip: int) -> tuple[CompiledProgram, CompiledProgram]:
        """(denoise, decode) for `batch_per_chip` samples on each chip; DoesNotFit when either does not fit."""
        batch = batch_per_chip * self.slice.chips
        with tracing_for(self.slice.platform):  # the modules' init, traced for the parameters' shapes, picks the slice's kernels too
            params = self.params()
        schedule = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), self.scheduler.make_schedule())
        tokens = self.text_encoder.config.max_position_embeddings
        denoise_args = denoise_arguments(params, schedule, batch, self.latent_shape, tokens, self.settings.steps)
        denoise = denoise_program(self.unet, self.text_encoder, 0.0, self.scheduler.prediction_type, True, self.mesh)
        decode = decode_program(self.vae, self.mesh)
        return (
            compile_program("denoise", lambda: denoise.trace(*denoise_args), self.slice),
            compile_program("decode", lambda: decode.trace(params, denoise_args[2]), self.slice),
        )
