"""DDIM sampling (Song et al. 2021) matching diffusers' torch ``DDIMScheduler``, as one ``lax.scan``.

LayerDiff additions: per-layer timesteps and *frozen* layers. A frozen layer is never denoised: it keeps
its given clean latent and is shown to the model with timestep ``frozen_timestep`` (1 in the paper's
layer inpainting / style transfer). ``img2img_start`` starts part-way down the chain (style transfer).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule, add_noise, expand_to

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
LATENT_AXES = 3  # (h, w, C): everything before them is batch (B,) or batch x layer (B, L)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    steps_offset: int = 1,
    timestep_spacing: str = "leading",
) -> np.ndarray:
    """Descending int64 timesteps, identical to diffusers' ``DDIMScheduler.set_timesteps``."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}"
        )
    if timestep_spacing == "leading":
        ratio = num_train_timesteps // num_inference_steps
        return (np.arange(num_inference_steps) * ratio)[::-1].astype(np.int64) + steps_offset
    if timestep_spacing == "trailing":
        ratio = num_train_timesteps / num_inference_steps
        return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    if timestep_spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")


def ddim_prev_timesteps(
    timesteps: np.ndarray, num_inference_steps: int, num_train_timesteps: int = 1000
) -> np.ndarray:
    """diffusers' target of each step, ``t - T // N`` (negative means "use final_alpha_cumprod").

    ``ddim_sample`` defaults to stepping to the next listed timestep instead; the two agree for
    "leading" spacing (SD-1.5) and whenever N divides T. Pass this as ``prev_timesteps`` for exact
    diffusers behaviour with "trailing"/"linspace" and other N.
    """
    return np.asarray(timesteps) - num_train_timesteps // num_inference_steps


def _alpha_prod(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """alphas_cumprod[t], with the schedule's final value for t < 0 (the step past t = 0)."""
    t = jnp.asarray(t)
    return jnp.where(t >= 0, jnp.take(schedule.alphas_cumprod, jnp.maximum(t, 0)), schedule.final_alpha_cumprod)


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    x: jax.Array,
    eta: float = 0.0,
    noise: jax.Array | None = None,
    *,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
) -> jax.Array:
    """One DDIM update x_t -> x_{t_prev} (diffusers' ``DDIMScheduler.step``, returns ``prev_sample``).

    ``t`` / ``t_prev`` are int arrays of shape ``()``, ``(B,)`` or ``(B, L)`` matching x's leading axes.
    ``noise`` (shape of x) is required when ``eta > 0``; ``clip_sample_range`` clips predicted x0.
    """
    if model_output.shape != x.shape:
        raise ValueError(f"model output shape {model_output.shape} != sample shape {x.shape}")
    a_t = expand_to(_alpha_prod(schedule, t), x)
    a_prev = expand_to(_alpha_prod(schedule, t_prev), x)
    b_t = 1.0 - a_t
    if prediction_type == "epsilon":
        pred_x0 = (x - b_t**0.5 * model_output) / a_t**0.5
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = a_t**0.5 * x - b_t**0.5 * model_output
        pred_eps = a_t**0.5 * model_output + b_t**0.5 * x
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (x - a_t**0.5 * pred_x0) / b_t**0.5
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if clip_sample_range is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)

    variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev)
    std = eta * variance**0.5
    # max(., 0) only guards rounding at eta = 1, where the bracket is ~0; elsewhere it is a no-op.
    x_prev = a_prev**0.5 * pred_x0 + jnp.maximum(1.0 - a_prev - std**2, 0.0) ** 0.5 * pred_eps
    if noise is None:
        if not isinstance(eta, jax.Array) and eta != 0:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        return x_prev
    return x_prev + std * noise


def ddim_sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    timesteps: jax.Array | np.ndarray,
    schedule: NoiseSchedule,
    *,
    prev_timesteps: jax.Array | np.ndarray | None = None,
    eta: float = 0.0,
    rng: jax.Array | None = None,
    frozen: jax.Array | None = None,
    frozen_timestep: int = 1,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs DDIM over ``timesteps`` (descending) in one ``lax.scan``; jit the caller, not this.

    Args:
      model_fn: ``model_fn(x, t) -> model_output`` with x shaped like ``x_T`` and t int32 of shape
        ``x_T.shape[:-3]`` ((B,) for (B, h, w, C) latents, (B, L) for (B, L, h, w, C) layered latents).
        Traced once, inside the scan body.
      x_T: starting latent (pure noise, or ``img2img_start``'s output).
      timesteps: int (N,) from ``ddim_timesteps`` (or its img2img suffix); may be a traced array, so
        different timestep values of the same length do not recompile.
      prev_timesteps: int (N,) step targets; default: the next entry of ``timesteps``, then -1 (the
        final alpha), which equals diffusers for SD-1.5's "leading" spacing (see ``ddim_prev_timesteps``).
      eta: DDIM stochasticity, a Python float (0 = deterministic). With eta != 0, step i adds
        ``jax.random.normal(jax.random.split(rng, N)[i], x.shape, x.dtype)`` scaled by sigma_t.
      frozen: bool of shape ``x_T.shape[:-3]``; True entries (e.g. non-target layers) keep their
        ``x_T`` value bit-for-bit and are given timestep ``frozen_timestep`` as model input.
      return_trajectory: also return every intermediate sample, shape (N, *x_T.shape).

    Returns:
      The final sample, or ``(final, trajectory)`` with ``trajectory[i]`` the sample after step i.
    """
    lead_shape = x_T.shape[:-LATENT_AXES]
    timesteps = jnp.asarray(timesteps, jnp.int32)
    if timesteps.ndim != 1 or timesteps.shape[0] == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {timesteps.shape}")
    if prev_timesteps is None:
        prev_timesteps = jnp.concatenate([timesteps[1:], jnp.full((1,), -1, jnp.int32)])
    prev_timesteps = jnp.asarray(prev_timesteps, jnp.int32)
    if prev_timesteps.shape != timesteps.shape:
        raise ValueError(f"prev_timesteps shape {prev_timesteps.shape} != timesteps shape {timesteps.shape}")
    if eta != 0 and rng is None:
        raise ValueError("ddim_sample with eta != 0 needs `rng`")
    if frozen is not None and frozen.shape != lead_shape:
        raise ValueError(f"frozen shape {frozen.shape} must equal the latent's leading axes {lead_shape}")

    noise_keys = jax.random.split(rng, timesteps.shape[0]) if eta != 0 else None

    def body(x, step):
        t, t_prev, key = step
        t_in = jnp.broadcast_to(t, lead_shape)
        if frozen is not None:
            t_in = jnp.where(frozen, jnp.int32(frozen_timestep), t_in)
        out = model_fn(x, t_in)
        noise = None if key is None else jax.random.normal(key, x.shape, x.dtype)
        x_new = ddim_step(
            schedule, out, t, t_prev, x, eta, noise,
            prediction_type=prediction_type, clip_sample_range=clip_sample_range,
        )
        if frozen is not None:
            x_new = jnp.where(expand_to(frozen, x), x_T, x_new)
        x_new = x_new.astype(x.dtype)
        return x_new, (x_new if return_trajectory else None)

    x_0, trajectory = jax.lax.scan(body, x_T, (timesteps, prev_timesteps, noise_keys))
    return (x_0, trajectory) if return_trajectory else x_0


def img2img_timesteps(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """diffusers' img2img truncation: keep the last ``int(N * strength)`` of the N timesteps.

    LayerDiff style transfer: 100 steps at strength 0.25 -> the last (least noisy) 25.
    """
    n = len(timesteps)
    init = min(int(n * strength), n)
    if init < 1:
        raise ValueError(f"strength {strength} with {n} steps leaves no denoising step")
    return np.asarray(timesteps)[n - init :]


def img2img_start(
    schedule: NoiseSchedule,
    x0: jax.Array,
    noise: jax.Array,
    timesteps: np.ndarray,
    strength: float,
    frozen: jax.Array | None = None,
) -> tuple[np.ndarray, jax.Array]:
    """Truncated timesteps and the start latent: ``x0`` noised to the first kept timestep.

    ``frozen`` entries (shape ``x0.shape[:-3]``) stay clean, ready for ``ddim_sample(frozen=...)``.
    """
    kept = img2img_timesteps(timesteps, strength)
    x_start = add_noise(schedule, x0, noise, jnp.full(x0.shape[:-LATENT_AXES], kept[0], jnp.int32))
    if frozen is not None:
        x_start = jnp.where(expand_to(frozen, x0), x0, x_start)
    return kept, x_start
