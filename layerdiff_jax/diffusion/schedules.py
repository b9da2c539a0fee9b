"""Noise schedules, forward noising (q_sample), training targets and LayerDiff's training-timestep policy.

Conventions follow diffusers' DDPM/DDIM schedulers so SD-1.5 weights see the noise levels they were
trained on. Timesteps index ``alphas_cumprod`` and may have one entry per sample ``(B,)`` or one per
layer ``(B, L)``; coefficients broadcast over the trailing (h, w, C) axes. `SchedulerConfig` is what a
trained model carries to sampling (its schedule and what it predicts).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what the model outputs (diffusers' names)


class NoiseSchedule(NamedTuple):
    """Discrete diffusion schedule (a pytree: pass it through ``jax.jit`` as an argument or close over it).

    Attributes:
      betas: float32 ``(T,)``.
      alphas_cumprod: float32 ``(T,)``, ``prod_{s<=t} (1 - beta_s)``.
      final_alpha_cumprod: float32 scalar, the "previous" alpha_cumprod used by DDIM's last step
        (1.0 with diffusers' ``set_alpha_to_one=True``, else ``alphas_cumprod[0]``).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    set_alpha_to_one: bool = False,
) -> NoiseSchedule:
    """Builds the schedule the way diffusers does (defaults: SD-1.5's config).

    Computed in float64 and stored as float32, which agrees with diffusers' float32 arithmetic to ~1e-7.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
    )


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The schedule a model was trained with and what it predicts; sampling must use the same. The defaults
    are SD 1.5's. Model folders store it as a diffusers `DDIMScheduler` config (`scheduler/scheduler_config.json`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    def make_schedule(self) -> NoiseSchedule:
        return make_schedule(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)

    def to_diffusers_config(self) -> dict[str, Any]:
        """diffusers' DDIMScheduler config for the sampler this project runs (SD 1.5's "leading" spacing)."""
        return {
            "_class_name": "DDIMScheduler",
            **dataclasses.asdict(self),
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "SchedulerConfig":
        """Our fields from a diffusers scheduler config (absent ones at SD 1.5's values). Settings that would
        give a schedule this project does not build are refused, naming the field."""
        unsupported = {"trained_betas": None, "rescale_betas_zero_snr": False}
        for key, supported in unsupported.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported (only {supported!r})")
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


def expand_to(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Appends singleton axes so a per-sample / per-layer coefficient broadcasts against ``x``.

    ``coef`` must match the leading axes of ``x`` (or be a scalar): ``(B,)`` vs ``(B, h, w, C)``,
    ``(B, L)`` vs ``(B, L, h, w, C)``.
    """
    if coef.ndim > x.ndim or (coef.ndim and coef.shape != x.shape[: coef.ndim]):
        raise ValueError(
            f"timestep shape {coef.shape} must be a scalar or match the leading axes of the "
            f"latent shape {x.shape}"
        )
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """q(x_t | x_0): ``sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise`` (diffusers' ``add_noise``).

    ``t`` is an integer array of shape ``()``, ``(B,)`` or ``(B, L)`` matching the leading axes of ``x0``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {x0.shape} and noise shape {noise.shape} differ")
    abar = jnp.take(schedule.alphas_cumprod, jnp.asarray(t)).astype(x0.dtype)
    return expand_to(jnp.sqrt(abar), x0) * x0 + expand_to(jnp.sqrt(1.0 - abar), x0) * noise


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: str) -> jax.Array:
    """What the model learns to output for ``add_noise(schedule, x0, noise, t)``: the noise ("epsilon", SD 1.5),
    the velocity ``sqrt(abar) * noise - sqrt(1 - abar) * x0`` ("v_prediction", diffusers' ``get_velocity``)
    or ``x0`` ("sample")."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = jnp.take(schedule.alphas_cumprod, jnp.asarray(t)).astype(x0.dtype)
        return expand_to(jnp.sqrt(abar), x0) * noise - expand_to(jnp.sqrt(1.0 - abar), x0) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, prediction_type: str, gamma: float) -> jax.Array:
    """Per-timestep loss weights of Min-SNR-gamma (Hang et al., 2023, arXiv:2303.09556), float32 of ``t``'s shape:
    each timestep's loss counts as an x0 loss weighted by ``min(SNR_t, gamma)``, ``SNR_t = abar / (1 - abar)``, as
    diffusers' training scripts weight it. The low-noise steps (SNR above gamma) count less; against plain MSE on
    velocity targets the highest-noise steps count less too. ``gamma = 0`` weights every timestep 1 (plain MSE).
    """
    if gamma == 0:
        return jnp.ones(jnp.shape(t), jnp.float32)
    abar = jnp.take(schedule.alphas_cumprod, jnp.asarray(t)).astype(jnp.float32)
    snr = abar / (1.0 - abar)
    # The target's own scale relative to x0's error: eps = x0 * sqrt(snr), v = x0 * sqrt(snr + 1).
    per_target = {"epsilon": snr, "v_prediction": snr + 1.0, "sample": jnp.ones_like(snr)}
    if prediction_type not in per_target:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return jnp.minimum(snr, gamma) / per_target[prediction_type]


def sample_noise(rng: jax.Array, shape: tuple[int, ...], offset: float = 0.0) -> jax.Array:
    """Training noise, float32 ``shape`` = (..., h, w, C): standard normal, plus ``offset`` times one normal
    draw per image and channel when ``offset > 0`` ("offset noise").

    Why: SD's schedule never destroys an image's mean colour (at t = 999, sqrt(abar) = 0.068 of the signal is
    left and averaging over h*w pixels removes most of the noise), so a model learns to read each layer's
    colour from its input rather than from its prompt, and then samples from pure noise in whatever colour
    the noise's mean suggests. A constant-per-image noise term hides the mean at high t, so the prompt must
    carry it.
    """
    k_pixel, k_offset = jax.random.split(rng)
    noise = jax.random.normal(k_pixel, shape, jnp.float32)
    if offset:
        per_image = (*shape[:-3], 1, 1, shape[-1])
        noise = noise + offset * jax.random.normal(k_offset, per_image, jnp.float32)
    return noise


def sample_timesteps(
    rng: jax.Array,
    batch: int,
    num_layers: int,
    num_train_timesteps: int,
    p_shared: float = 0.5,
    late_portion: float = 0.25,
    late_multiplier: float = 1.0,
) -> jax.Array:
    """LayerDiff's training timesteps, int32 ``(batch, num_layers)``.

    With probability ``p_shared`` a sample uses one t for all its layers; otherwise each layer draws its
    own t. Every t is uniform on ``[0, num_train_timesteps)``, except that the last ``late_portion`` of the
    timesteps (the noisiest) are drawn ``late_multiplier`` times as often as the others, as diffusers'
    training scripts bias them (``timestep_bias_strategy="later"``).
    """
    if not 0.0 <= p_shared <= 1.0:
        raise ValueError(f"p_shared must be in [0, 1], got {p_shared}")
    if not 0.0 < late_portion < 1.0 or late_multiplier <= 0.0:
        raise ValueError(f"late_portion must be in (0, 1) and late_multiplier > 0, got {late_portion}, {late_multiplier}")

    def draw(key, shape):
        if late_multiplier == 1.0:
            return jax.random.randint(key, shape, 0, num_train_timesteps, jnp.int32)
        late = np.arange(num_train_timesteps) >= num_train_timesteps - round(late_portion * num_train_timesteps)
        logits = jnp.asarray(np.log(np.where(late, late_multiplier, 1.0)), jnp.float32)
        return jax.random.categorical(key, logits, shape=shape).astype(jnp.int32)

    k_flag, k_shared, k_layer = jax.random.split(rng, 3)
    shared = jax.random.bernoulli(k_flag, p_shared, (batch, 1))
    t_shared = draw(k_shared, (batch, 1))
    t_layer = draw(k_layer, (batch, num_layers))
    return jnp.where(shared, t_shared, t_layer)
