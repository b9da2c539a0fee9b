"""The training loss and the jitted, sharded train step (the paper's training objective).

The frozen VAE and text encoder run inside the step on the batch as the data pipeline delivers it (pixels
and token ids): a dataset stays independent of the VAE and resolution, and each latent can be a fresh
posterior sample. At SD size the VAE encoder is a small part of a LayerDiff step; where it is not (the toy
models), `config.train.cache_latents` has the trainer encode each record once (`latent_cache.py`) and the
batch bring `latents` instead. Per micro-batch:

1. latents: the VAE encodes every layer's image and its mask (repeated to 3 channels, mapped to [-1, 1]);
   image latent ++ mask latent gives the model's 8 channels (or the batch's cached `latents`);
2. prompts: the text encoder embeds the global and layer prompts; 10%/10% of samples (config) have
   their global / all their layer prompts replaced by the empty prompt's embedding;
3. timesteps: one t for all layers of a sample with probability p_shared, else one per layer;
4. loss: MSE between the model output and its target (the noise as SD 1.5 trains, or the velocity or x0:
   `diffusion.prediction_type`; the noise optionally with per-image offset noise) of the image and mask
   latents, over valid layers.

The toy base's pretraining uses the same step with SD's own objective on flat images
(`text_to_image_micro_loss`). Gradients of `grad_accum_steps` micro-batches are averaged in a `lax.scan`, then clipped and applied
once by the optimizer, and the EMA (if on) follows the new parameters, its decay warmed up over the first steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layerdiff_jax.diffusion.schedules import (
    NoiseSchedule,
    SchedulerConfig,
    add_noise,
    min_snr_weight,
    sample_noise,
    sample_timesteps,
    training_target,
)
from layerdiff_jax.mesh import BATCH_AXES, mesh_rules
from layerdiff_jax.models.clip_text import CLIPTextTransformer
from layerdiff_jax.models.layerdiff import LayerDiffUNet
from layerdiff_jax.models.text_to_image import TextToImageModel
from layerdiff_jax.models.vae import AutoencoderKL, encode_layers
from layerdiff_jax.training.latent_cache import LATENTS
from layerdiff_jax.training.state import TrainState, learning_rate_schedule

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FrozenEncoders:
    """The frozen SD components; their parameters are passed to the step as {"vae": ..., "text_encoder": ...}."""

    vae: AutoencoderKL
    text_encoder: CLIPTextTransformer


def scheduler_from_config(diffusion: ml_collections.ConfigDict) -> SchedulerConfig:
    """The training config's schedule and prediction type, as the model folder records them for sampling."""
    return SchedulerConfig(**{f.name: diffusion[f.name] for f in dataclasses.fields(SchedulerConfig)})


def encode_prompts(encoders: FrozenEncoders, text_params, global_ids, layer_ids) -> tuple[jax.Array, jax.Array]:
    """global_ids (B,T), layer_ids (B,L,T) -> global context (B,T,D), layer context (B,L,T,D), in one pass."""
    batch, num_layers, length = layer_ids.shape
    ids = jnp.concatenate([global_ids[:, None], layer_ids], axis=1).reshape(batch * (num_layers + 1), length)
    context = encoders.text_encoder.apply({"params": text_params}, ids).reshape(batch, num_layers + 1, length, -1)
    return context[:, 0], context[:, 1:]


def drop_prompts(rng, global_context, layer_context, empty_context, p_global: float, p_layer: float):
    """Classifier-free guidance dropout: per sample, the global prompt (prob p_global) and, independently,
    all layer prompts (prob p_layer) become the empty prompt's embedding `empty_context` (T, D)."""
    k_global, k_layer = jax.random.split(rng)
    batch = global_context.shape[0]
    drop_global = jax.random.bernoulli(k_global, p_global, (batch, 1, 1))
    drop_layer = jax.random.bernoulli(k_layer, p_layer, (batch, 1, 1, 1))
    return jnp.where(drop_global, empty_context, global_context), jnp.where(drop_layer, empty_context, layer_context)


def diffusion_loss(
    model: LayerDiffUNet,
    params,
    latents,
    global_context,
    layer_context,
    layer_valid,
    rng,
    schedule: NoiseSchedule,
    p_shared: float,
    noise_offset: float = 0.0,
    prediction_type: str = "epsilon",
    min_snr_gamma: float = 0.0,
    timestep_bias: tuple[float, float] = (0.25, 1.0),
    image_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MSE between the model output and its `prediction_type` target (the noise, as SD 1.5 trains, by default)
    over the image and mask latents of valid layers, each layer's weighted by Min-SNR-`min_snr_gamma` of its
    timestep (0: unweighted, as the paper trains), the timesteps drawn with `timestep_bias` (`sample_timesteps`'s
    late_portion and late_multiplier), the image latents' error weighted per position by `image_weights` (B, L, h, w,
    1) where given (`object_weights`); (loss, {loss_image, loss_mask})."""
    batch, num_layers = latents.shape[:2]
    k_t, k_noise = jax.random.split(rng)
    timesteps = sample_timesteps(k_t, batch, num_layers, schedule.num_train_timesteps, p_shared, *timestep_bias)
    noise = sample_noise(k_noise, latents.shape, noise_offset)
    noisy = add_noise(schedule, latents, noise, timesteps)
    pred = model.apply({"params": params}, noisy, timesteps, global_context, layer_context, layer_valid)
    err = jnp.square(pred.astype(jnp.float32) - training_target(schedule, latents, noise, timesteps, prediction_type))
    valid = layer_valid.astype(jnp.float32)
    count = jnp.maximum(valid.sum(), 1.0)
    weight = valid * min_snr_weight(schedule, timesteps, prediction_type, min_snr_gamma)
    channels = latents.shape[-1] // 2

    def over_valid_layers(e):
        return (e.mean(axis=(2, 3, 4)) * weight).sum() / count

    err_image = err[..., :channels] if image_weights is None else err[..., :channels] * image_weights
    loss_image, loss_mask = over_valid_layers(err_image), over_valid_layers(err[..., channels:])
    return (loss_image + loss_mask) / 2, {"loss_image": loss_image, "loss_mask": loss_mask}


def object_weights(masks: jax.Array, latent_side: int, weight: float) -> jax.Array:
    """Per-position weights (B, L, h, w, 1) of the image latents' error: 1 + `weight` x each foreground layer's mask
    (B, L, H, W, 1) averaged over the VAE's footprint of a latent, scaled to mean 1 per layer; the background's 1.
    An object is a small part of its layer, and the surround its mask hides takes the rest of plain MSE; these weights
    give the objects, whose colour and shape the prompts name, more of the loss at the same loss scale."""
    batch, layers, height, width, _ = masks.shape
    f = height // latent_side
    pooled = masks.reshape(batch, layers, height // f, f, width // f, f).mean(axis=(3, 5))[..., None]
    weights = 1.0 + weight * pooled.at[:, 0].set(0.0)
    return weights / weights.mean(axis=(2, 3), keepdims=True)


def loss_reads_masks(config: ml_collections.ConfigDict) -> bool:
    """Whether the layered loss needs the pixel masks beside the latents (`object_weights`)."""
    return config.diffusion.object_loss_weight > 0


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """The EMA's decay at `step` updates: `decay`, warmed up as (1 + step) / (10 + step) while that is smaller.
    A constant 0.999 would leave 0.999^500 = 61% of the initial weights in the average after 500 steps."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# micro_loss(params, micro_batch, rng, frozen_params, empty_prompt) -> (loss, metrics): one micro-batch's loss.
MicroLoss = Callable[[Any, Batch, jax.Array, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def layerdiff_micro_loss(model: LayerDiffUNet, encoders: FrozenEncoders, config: ml_collections.ConfigDict) -> MicroLoss:
    """LayerDiff's loss on a micro-batch of layered samples (steps 1-4 of the module docstring);
    `empty_prompt` is the empty prompt's embedding (T, D)."""
    train, schedule = config.train, scheduler_from_config(config.diffusion).make_schedule()

    def micro_loss(params, micro_batch, rng, frozen, empty_prompt):
        k_latent, k_drop, k_loss = jax.random.split(rng, 3)
        if LATENTS in micro_batch:  # encoded on the host by the trainer's LatentCache
            latents = micro_batch[LATENTS]
        else:
            latents = encode_layers(
                encoders.vae, frozen["vae"], micro_batch["images"], micro_batch["masks"], k_latent if train.sample_posterior else None
            )
        global_context, layer_context = encode_prompts(encoders, frozen["text_encoder"], micro_batch["global_ids"], micro_batch["layer_ids"])
        global_context, layer_context = drop_prompts(
            k_drop, global_context, layer_context, empty_prompt, train.global_prompt_dropout, train.layer_prompt_dropout
        )
        image_weights = (
            object_weights(micro_batch["masks"], latents.shape[2], config.diffusion.object_loss_weight) if loss_reads_masks(config) else None
        )
        return diffusion_loss(
            model, params, latents, global_context, layer_context, micro_batch["layer_valid"], k_loss, schedule,
            config.diffusion.p_shared_timestep, config.diffusion.noise_offset, config.diffusion.prediction_type,
            config.diffusion.min_snr_gamma, (config.diffusion.timestep_bias_portion, config.diffusion.timestep_bias_multiplier),
            image_weights,
        )

    return micro_loss


def text_to_image_micro_loss(model: TextToImageModel, vae: AutoencoderKL, config: ml_collections.ConfigDict) -> MicroLoss:
    """Plain text-to-image loss (SD's pretraining objective) on a micro-batch of flat images and their token ids:
    the VAE (frozen, `frozen["vae"]`) encodes the images, the model's own text encoder embeds the prompts, and
    `global_prompt_dropout` of the prompts become `empty_prompt`, the empty prompt's token ids (T,)."""
    train, diffusion = config.train, config.diffusion
    schedule = scheduler_from_config(diffusion).make_schedule()

    def micro_loss(params, micro_batch, rng, frozen, empty_prompt):
        k_latent, k_drop, k_t, k_noise = jax.random.split(rng, 4)
        images, ids = micro_batch["images"], micro_batch["ids"]
        latents = vae.apply({"params": frozen["vae"]}, images, k_latent if train.sample_posterior else None, method=AutoencoderKL.encode_latents)
        drop = jax.random.bernoulli(k_drop, train.global_prompt_dropout, (ids.shape[0], 1))
        ids = jnp.where(drop, empty_prompt, ids)
        timesteps = jax.random.randint(k_t, (images.shape[0],), 0, schedule.num_train_timesteps)
        noise = sample_noise(k_noise, latents.shape, diffusion.noise_offset)
        pred = model.apply({"params": params}, add_noise(schedule, latents, noise, timesteps), timesteps, ids)
        target = training_target(schedule, latents, noise, timesteps, diffusion.prediction_type)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
        return loss, {}

    return micro_loss


def compiler_options(train: ml_collections.ConfigDict, platform: str | None = None) -> dict[str, str] | None:
    """XLA options for the train step on `platform` (default: JAX's default backend): with
    `train.cpu_ynn_convolutions` off on a CPU, YNNPACK takes the individual matrix products only and XLA's own
    kernels the convolutions."""
    if train.cpu_ynn_convolutions or (platform or jax.default_backend()) != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def make_train_step(
    micro_loss: MicroLoss,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state_shardings: TrainState,
    frozen_shardings: Any,
) -> Callable[[TrainState, Batch, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch, frozen_params, empty_prompt) -> (state, metrics)`, jitted with the state donated.

    `batch` arrays are (grad_accum_steps, global micro-batch, ...) split over data x fsdp on axis 1;
    `empty_prompt` is what `micro_loss` puts in place of a dropped prompt; metrics are replicated float32 scalars.
    """
    train = config.train
    lr_schedule = learning_rate_schedule(train)

    def micro_step(params, micro_batch, rng, frozen, empty_prompt):
        loss_fn = lambda p: micro_loss(p, micro_batch, rng, frozen, empty_prompt)  # noqa: E731
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, **metrics}

    def train_step(state: TrainState, batch: Batch, frozen, empty_prompt):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        accum = jax.tree.leaves(batch)[0].shape[0]  # every array is (grad_accum_steps, micro-batch, ...)

        def accumulate(grad_sum, inputs):
            micro_batch, micro_rng = inputs
            grads, metrics = micro_step(state.params, micro_batch, micro_rng, frozen, empty_prompt)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        if accum == 1:  # XLA:CPU runs a loop body several times slower than the same code unrolled
            grads, metrics = micro_step(state.params, jax.tree.map(lambda x: x[0], batch), step_rng, frozen, empty_prompt)
            metrics = jax.tree.map(lambda x: x[None], metrics)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grad_sum, metrics = jax.lax.scan(accumulate, zeros, (batch, jax.random.split(step_rng, accum)))
            grads = jax.tree.map(lambda g: g / accum, grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            decay = ema_decay(state.step, train.ema_decay)
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
        metrics = {key: value.mean() for key, value in metrics.items()}
        metrics.update(grad_norm=optax.global_norm(grads), learning_rate=jnp.asarray(lr_schedule(state.step), jnp.float32))
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params, rng=jax.random.key_data(rng)
        )
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding, frozen_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=compiler_options(train, mesh.devices.flat[0].platform),  # the mesh's: AOT compiles for TPUs on a CPU
    )

    def step(state, batch, frozen_params, empty_prompt):
        with mesh_rules(mesh):
            return jitted(state, batch, frozen_params, empty_prompt)

    def lower(state, batch, frozen_params, empty_prompt):
        """The step lowered for these arguments: `.compile()` it to read XLA's memory analysis."""
        with mesh_rules(mesh):
            return jitted.lower(state, batch, frozen_params, empty_prompt)

    def trace(state, batch, frozen_params, empty_prompt):
        """The step traced for these arguments: its `.jaxpr` says what work one step does."""
        with mesh_rules(mesh):
            return jitted.trace(state, batch, frozen_params, empty_prompt)

    step.lower, step.trace = lower, trace
    return step
