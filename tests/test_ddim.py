"""DDIM sampler vs diffusers' torch DDIMScheduler; per-layer frozen layers; img2img starts; one compile."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

from layerdiff_jax.diffusion.ddim import (
    ddim_prev_timesteps,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    img2img_start,
    img2img_timesteps,
)
from layerdiff_jax.diffusion.schedules import add_noise, make_schedule

SD15 = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    prediction_type="epsilon",
)
SHAPE = (2, 8, 8, 4)


def schedule_for(cfg):
    return make_schedule(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"],
                         cfg["set_alpha_to_one"])


def torch_fake_model(x, t):
    # Denoiser-like: eps ~ x at high noise, ~0 near t = 0, so samples stay O(1) along the chain.
    return (t / 1000.0) ** 0.5 * x + 0.1 * torch.sin(3.0 * x)


def jax_fake_model(x, t):
    """Same function as torch_fake_model; t has one entry per leading (batch/layer) element."""
    t = (t.astype(jnp.float32) / 1000.0).reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return t**0.5 * x + 0.1 * jnp.sin(3.0 * x)


def diffusers_trajectory(cfg, num_steps, x_T, eta=0.0, noises=None, start=0):
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(np.array(x_T))
    out = []
    for i, t in enumerate(sched.timesteps[start:]):
        noise = None if noises is None else torch.from_numpy(np.array(noises[i]))
        x = sched.step(torch_fake_model(x, int(t)), t, x, eta=eta, variance_noise=noise).prev_sample
        out.append(x.numpy())
    return np.stack(out)


@pytest.mark.parametrize(
    "n, offset, spacing",
    [(50, 1, "leading"), (100, 1, "leading"), (7, 0, "leading"), (30, 0, "trailing"), (30, 0, "linspace")],
)
def test_timesteps_match_set_timesteps(n, offset, spacing):
    ref = DDIMScheduler(**{**SD15, "steps_offset": offset, "timestep_spacing": spacing})
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ddim_timesteps(n, 1000, offset, spacing), ref.timesteps.numpy())


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sd15_trajectory_matches_diffusers(eta):
    n = 50
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    rng = jax.random.key(1)
    # ddim_sample's documented noise: step i draws from the i-th split of rng.
    noises = [jax.random.normal(k, SHAPE) for k in jax.random.split(rng, n)] if eta else None
    sample = jax.jit(lambda x, r: ddim_sample(jax_fake_model, x, ddim_timesteps(n), schedule_for(SD15),
                                              eta=eta, rng=r, return_trajectory=True))
    final, traj = sample(x_T, rng if eta else None)
    expected = diffusers_trajectory(SD15, n, x_T, eta, noises)
    assert traj.shape == (n, *SHAPE)
    np.testing.assert_allclose(np.asarray(traj), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(traj[-1]))
    assert np.abs(expected[-1] - np.asarray(x_T)).max() > 0.1  # the chain actually moved


def test_other_configs_match_diffusers_with_explicit_prev_timesteps():
    # trailing spacing with N not dividing T: diffusers steps to t - T//N, not to the next listed t.
    cfg = {**SD15, "timestep_spacing": "trailing", "steps_offset": 0, "prediction_type": "v_prediction",
           "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.5}
    n = 30
    ts = ddim_timesteps(n, 1000, 0, "trailing")
    x_T = jax.random.normal(jax.random.key(2), SHAPE)
    _, traj = ddim_sample(jax_fake_model, x_T, ts, schedule_for(cfg), prev_timesteps=ddim_prev_timesteps(ts, n),
                          prediction_type="v_prediction", clip_sample_range=1.5, return_trajectory=True)
    np.testing.assert_allclose(np.asarray(traj), diffusers_trajectory(cfg, n, x_T), rtol=0, atol=1e-5)


def test_ddim_step_needs_noise_when_stochastic():
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(make_schedule(), x, 500, 480, x, eta=0.5)
    with pytest.raises(ValueError, match="shape"):
        ddim_step(make_schedule(), x[:1], 500, 480, x)


def test_scan_compiles_once():
    traces = []

    def model_fn(x, t):
        traces.append(t.shape)  # runs only while tracing
        return jax_fake_model(x, t)

    sched = make_schedule()
    sample = jax.jit(lambda x, ts, r: ddim_sample(model_fn, x, ts, sched, eta=0.3, rng=r))
    a = sample(jax.random.normal(jax.random.key(0), SHAPE), jnp.asarray(ddim_timesteps(50)), jax.random.key(1))
    n_traces = len(traces)
    b = sample(jax.random.normal(jax.random.key(3), SHAPE), jnp.asarray(ddim_timesteps(50, steps_offset=0)),
               jax.random.key(4))
    assert n_traces == 1, "the model must be traced once per compile, not once per step"
    assert len(traces) == n_traces and sample._cache_size() == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_frozen_layers_stay_clean_and_see_timestep_one():
    B, L = 2, 3
    frozen = jnp.array([[True, False, False], [False, True, True]])
    x_T = jax.random.normal(jax.random.key(5), (B, L, 8, 8, 4))

    def layer_mixing_model(x, t):
        assert t.shape == (B, L)
        # Every layer's output depends on all layers' latents and timesteps, as in LayerDiff's UNet.
        mix = jnp.mean(x, axis=1, keepdims=True) + jnp.mean(t / 1000.0, 1)[:, None, None, None, None]
        return jax_fake_model(x + 0.1 * mix, t)

    sched = make_schedule()
    ts = ddim_timesteps(20)
    final, traj = jax.jit(lambda x: ddim_sample(layer_mixing_model, x, ts, sched, frozen=frozen,
                                                return_trajectory=True))(x_T)
    mask = np.asarray(frozen)
    for step in np.asarray(traj):
        np.testing.assert_array_equal(step[mask], np.asarray(x_T)[mask])
    # Reference: the same chain written out step by step with the frozen layers' t set to 1.
    x = x_T
    for t, t_prev in zip(ts, list(ts[1:]) + [-1]):
        t_in = jnp.where(frozen, 1, jnp.full((B, L), t, jnp.int32))
        x = jnp.where(frozen[..., None, None, None], x_T, ddim_step(sched, layer_mixing_model(x, t_in), t, t_prev, x))
    np.testing.assert_allclose(np.asarray(final), np.asarray(x), rtol=0, atol=1e-5)
    assert np.abs(np.asarray(final - x_T)[~mask]).max() > 0.1
    with pytest.raises(ValueError, match="frozen shape"):
        ddim_sample(layer_mixing_model, x_T, ts, sched, frozen=frozen[:, :2])


def test_img2img_start_matches_diffusers_img2img():
    n, strength = 100, 0.25
    ref_sched = DDIMScheduler(**SD15)
    ref_sched.set_timesteps(n)
    fake_pipe = types.SimpleNamespace(scheduler=ref_sched)
    ref_ts, ref_steps = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, n, strength, "cpu")
    kept = img2img_timesteps(ddim_timesteps(n), strength)
    np.testing.assert_array_equal(kept, ref_ts.numpy())
    assert len(kept) == ref_steps == 25 and kept[0] == 241
    ref_sched.set_timesteps(50)
    for s in (0.3, 0.29, 1.0):  # float truncation follows diffusers' int(N * strength)
        ref_ts, _ = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, 50, s, "cpu")
        np.testing.assert_array_equal(img2img_timesteps(ddim_timesteps(50), s), ref_ts.numpy())
    with pytest.raises(ValueError, match="no denoising step"):
        img2img_timesteps(ddim_timesteps(n), 0.001)

    # Layered: layer 1 is the target; layers 0 and 2 stay clean and frozen.
    sched = make_schedule()
    x0 = jax.random.normal(jax.random.key(6), (1, 3, 8, 8, 4))
    noise = jax.random.normal(jax.random.key(7), x0.shape)
    frozen = jnp.array([[True, False, True]])
    kept, x_start = img2img_start(sched, x0, noise, ddim_timesteps(n), strength, frozen=frozen)
    np.testing.assert_array_equal(np.asarray(x_start)[0, [0, 2]], np.asarray(x0)[0, [0, 2]])
    np.testing.assert_array_equal(np.asarray(x_start[0, 1]), np.asarray(add_noise(sched, x0, noise, 241)[0, 1]))
    # Denoising the suffix with the default step targets equals diffusers' img2img loop.
    target = x_start[:, 1]
    ours = ddim_sample(jax_fake_model, target, kept, sched)
    ref = diffusers_trajectory(SD15, n, target, start=n - 25)[-1]
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-5)
