"""The train program: what one training step is for a config on a mesh, built from the components' architectures
alone (no weights, no data).

`build_train_program` makes the modules (the trained LayerDiff UNet, or SD's UNet with its text encoder; the frozen
VAE and text encoder), the optimizer, the abstract train state and its shardings, the frozen parameters' shardings
and the jitted step (`step.py`). The trainer (`trainer.py`) builds it, then loads weights and data into it;
`layerdiff_jax.aot` builds the same program and compiles it from `abstract_inputs` for a TPU slice ahead of time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layerdiff_jax.convert.core import read_config
from layerdiff_jax.data.loader import batch_shapes
from layerdiff_jax.training.latent_cache import with_latents
from layerdiff_jax.mesh import BATCH_AXES, batch_size_divisor
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet
from layerdiff_jax.models.text_to_image import TextToImageModel
from layerdiff_jax.models.unet import UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig
from layerdiff_jax.training.config import ConfigError
from layerdiff_jax.training.state import (
    TrainState,
    abstract_boxed_state,
    abstract_state,
    frozen_param_shardings,
    make_optimizer,
)
from layerdiff_jax.training.step import FrozenEncoders, layerdiff_micro_loss, loss_reads_masks, make_train_step, text_to_image_micro_loss


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    """The architectures of an SD folder's three components."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig

    @classmethod
    def sd15(cls) -> "ModelConfigs":
        return cls(UNetConfig.sd15(), VAEConfig.sd15(), CLIPTextConfig.sd15())

    @classmethod
    def from_folder(cls, sd_path: Path) -> "ModelConfigs":
        """From a converted or diffusers SD folder's `unet/`, `vae/` and `text_encoder/` config.json files."""
        vae = read_config(sd_path / "vae", VAEConfig.from_diffusers_config)
        text_encoder = read_config(sd_path / "text_encoder", CLIPTextConfig.from_diffusers_config)
        return cls(read_config(sd_path / "unet", UNetConfig.from_diffusers_config), vae, text_encoder)


def check_sizes(config: ml_collections.ConfigDict, mesh: Mesh, unet_config: UNetConfig, vae_factor: int, processes: int) -> None:
    """Batch and image sizes the mesh and the model can take; raised before anything is compiled."""
    global_micro_batch = config.train.per_host_batch_size * processes
    divisor = batch_size_divisor(mesh)
    if global_micro_batch % divisor:
        raise ConfigError(
            f"config.train.per_host_batch_size={config.train.per_host_batch_size} x {processes} process(es) "
            f"= {global_micro_batch} samples per micro-batch, not divisible by the {divisor} devices of the mesh's "
            f"data x fsdp axes (config.mesh.shape={tuple(config.mesh.shape)})"
        )
    multiple = vae_factor * 2 ** (len(unet_config.block_out_channels) - 1)
    if config.data.resolution % multiple:
        raise ConfigError(f"config.data.resolution={config.data.resolution} must be a multiple of {multiple} for this VAE and UNet")
    layerdiff = config.model.layerdiff
    uses_enhancer = layerdiff.use_layer_prompts and layerdiff.prompt_enhancer != "none"
    if uses_enhancer and unet_config.cross_attention_dim % layerdiff.enhancer_heads:
        raise ConfigError(
            f"config.model.layerdiff.enhancer_heads={layerdiff.enhancer_heads} does not divide the text width "
            f"{unet_config.cross_attention_dim}"
        )


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    config: ml_collections.ConfigDict
    mesh: Mesh
    layered: bool  # LayerDiff (config.model.kind "layerdiff"), else SD's own text-to-image objective
    model: LayerDiffUNet | TextToImageModel  # the trained module
    vae: AutoencoderKL  # frozen
    text_encoder: CLIPTextTransformer  # frozen for LayerDiff, part of `model` for text-to-image
    tx: Any  # optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    frozen_modules: dict[str, tuple[Any, tuple]]  # {name: (module, example inputs)}: what the step gets as frozen params
    frozen_shardings: dict[str, Any]
    step: Callable  # step(state, batch, frozen_params, empty_prompt) -> (state, metrics), with .lower and .trace

    def abstract_inputs(self, processes: int, token_length: int) -> tuple[TrainState, dict, dict, jax.ShapeDtypeStruct]:
        """The step's arguments (state, batch, frozen params, empty prompt) as ShapeDtypeStructs with their shardings,
        for `processes` hosts each loading config.train.per_host_batch_size samples per micro-batch."""
        config = self.config
        train = config.train
        batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES))
        samples = batch_shapes(
            train.per_host_batch_size * processes, config.model.layerdiff.max_layers, config.data.resolution, token_length,
            flat=not self.layered,
        )
        if train.cache_latents:
            side = config.data.resolution // self.vae.config.downsample_factor
            samples = with_latents(
                samples, (side, side, 2 * self.vae.config.latent_channels), jnp.float32, keep_masks=loss_reads_masks(config)
            )
        # As the trainer hands it to the step: (grad_accum_steps, global micro-batch, ...), split on axis 1.
        batch = {
            key: jax.ShapeDtypeStruct((train.grad_accum_steps, *s.shape), s.dtype, sharding=batch_sharding) for key, s in samples.items()
        }
        frozen = {
            name: jax.tree.map(
                lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                abstract_params(module, *example),
                self.frozen_shardings[name],
            )
            for name, (module, example) in self.frozen_modules.items()
        }
        replicated = NamedSharding(self.mesh, PartitionSpec())
        ids = jax.ShapeDtypeStruct((1, token_length), jnp.int32)
        if self.layered:  # the empty prompt's embedding
            text = abstract_params(self.text_encoder, ids)
            empty = jax.eval_shape(lambda p, i: self.text_encoder.apply({"params": p}, i)[0], text, ids)
        else:  # its token ids
            empty = jax.ShapeDtypeStruct((token_length,), jnp.int32)
        return self.abstract_state, batch, frozen, jax.ShapeDtypeStruct(empty.shape, empty.dtype, sharding=replicated)


def build_train_program(
    config: ml_collections.ConfigDict, mesh: Mesh, models: ModelConfigs, *, token_length: int, processes: int
) -> TrainProgram:
    """The train program of a validated `config` on `mesh` for components of `models`' architectures, fed by
    `processes` hosts with prompts of `token_length` tokens. Sizes the mesh or the model cannot take raise ConfigError."""
    vae_factor = models.vae.downsample_factor
    check_sizes(config, mesh, models.unet, vae_factor, processes)
    dtype = jnp.dtype(config.model.compute_dtype)
    impl = config.model.attention_impl
    vae = AutoencoderKL(models.vae, dtype=dtype, attention_impl=impl)
    text_encoder = CLIPTextTransformer(models.text_encoder, dtype=dtype, attention_impl=impl)
    layered = config.model.kind == "layerdiff"
    if layered:
        model = LayerDiffUNet(
            models.unet, LayerDiffConfig(**config.model.layerdiff), dtype=dtype, attention_impl=impl, remat=config.model.remat
        )
    else:
        model = TextToImageModel(models.unet, models.text_encoder, dtype=dtype, attention_impl=impl, remat=config.model.remat)

    # Shardings from logical axes.
    tx = make_optimizer(config.train)
    abstract, state_shardings = abstract_state(abstract_boxed_state(model, tx, ema=config.train.ema), mesh)
    frozen_modules = {"vae": (vae, (jnp.zeros((1, vae_factor, vae_factor, 3)),))}
    if layered:
        frozen_modules["text_encoder"] = (text_encoder, (jnp.zeros((1, token_length), jnp.int32),))
    frozen_shardings = frozen_param_shardings(frozen_modules, mesh)

    if layered:
        micro_loss = layerdiff_micro_loss(model, FrozenEncoders(vae, text_encoder), config)
    else:
        micro_loss = text_to_image_micro_loss(model, vae, config)
    step = make_train_step(micro_loss, tx, config, mesh, state_shardings, frozen_shardings)
    return TrainProgram(
        config, mesh, layered, model, vae, text_encoder, tx, abstract, state_shardings, frozen_modules, frozen_shardings, step
    )
