"""Noise schedule, q_sample and training-timestep policy vs diffusers' torch DDPMScheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from layerdiff_jax.diffusion.schedules import (
    SchedulerConfig,
    add_noise,
    make_schedule,
    min_snr_weight,
    sample_noise,
    sample_timesteps,
    training_target,
)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    ],
)
def test_schedule_matches_diffusers(kwargs):
    ref = DDPMScheduler(num_train_timesteps=1000, **kwargs)
    sched = make_schedule(1000, **kwargs)
    assert sched.num_train_timesteps == 1000
    assert sched.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)


def test_final_alpha_cumprod():
    assert float(make_schedule(set_alpha_to_one=True).final_alpha_cumprod) == 1.0
    sched = make_schedule(set_alpha_to_one=False)
    assert float(sched.final_alpha_cumprod) == float(sched.alphas_cumprod[0])


def test_unknown_beta_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_schedule(beta_schedule="cosine")


@pytest.mark.parametrize("shape, t_shape", [((3, 8, 8, 4), (3,)), ((2, 3, 8, 8, 4), (2, 3))])
def test_add_noise_matches_diffusers(shape, t_shape):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, 1000, t_shape)
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # diffusers broadcasts one timestep per leading element: fold (B, L) into the batch axis.
    lead = int(np.prod(t_shape))
    expected = ref.add_noise(
        torch.from_numpy(x0.reshape(lead, *shape[len(t_shape):])),
        torch.from_numpy(noise.reshape(lead, *shape[len(t_shape):])),
        torch.from_numpy(t.reshape(lead)),
    ).numpy().reshape(shape)
    got = jax.jit(add_noise)(make_schedule(), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    # Our alphas_cumprod come from float64 (as in the original SD code), diffusers' from a float32
    # cumprod: sqrt(1 - abar) differs by <= 7e-7, times |noise| <= ~4.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=5e-6)


def test_add_noise_rejects_mismatched_timesteps():
    x = jnp.zeros((2, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="timestep shape"):
        add_noise(make_schedule(), x, x, jnp.zeros((3, 2), jnp.int32))


def test_sample_timesteps_policy():
    batch, layers, steps = 4000, 3, 1000
    t = sample_timesteps(jax.random.key(0), batch, layers, steps, p_shared=0.5)
    assert t.shape == (batch, layers) and t.dtype == jnp.int32
    t = np.asarray(t)
    assert t.min() >= 0 and t.max() < steps
    shared = (t == t[:, :1]).all(axis=1)
    # Independent rows coincide with probability ~1e-6, so the shared fraction estimates p_shared.
    assert abs(shared.mean() - 0.5) < 0.04
    assert abs(t.mean() - (steps - 1) / 2) < 15  # uniform marginal
    assert (np.asarray(sample_timesteps(jax.random.key(1), 64, layers, steps, p_shared=1.0)) ==
            np.asarray(sample_timesteps(jax.random.key(1), 64, layers, steps, p_shared=1.0))[:, :1]).all()
    never = np.asarray(sample_timesteps(jax.random.key(2), 64, layers, steps, p_shared=0.0))
    assert not (never == never[:, :1]).all(axis=1).any()


def test_sample_timesteps_bias_towards_the_noisiest():
    def late_share(**bias):
        t = np.asarray(sample_timesteps(jax.random.key(3), 4000, 3, 1000, 0.5, **bias))
        assert t.min() >= 0 and t.max() < 1000
        return (t >= 750).mean(), t[t < 750].mean(), t[t >= 750].mean()

    # Multiplier 3 on the last quarter: 0.25 * 3 / (0.25 * 3 + 0.75) = half of the draws, each part uniform.
    for multiplier, expected in ((1.0, 0.25), (3.0, 0.5)):
        share, early_mean, late_mean = late_share(late_portion=0.25, late_multiplier=multiplier)
        assert abs(share - expected) < 0.02 and abs(early_mean - 374.5) < 10 and abs(late_mean - 874.5) < 5
    with pytest.raises(ValueError, match="late_portion"):
        sample_timesteps(jax.random.key(0), 2, 2, 1000, late_portion=1.0)


def test_sample_noise_offset():
    shape = (256, 3, 16, 16, 4)
    plain = np.asarray(sample_noise(jax.random.key(0), shape))
    # Without an offset, an image's per-channel mean has the std of an average of 16*16 normals.
    assert abs(plain.std() - 1.0) < 0.01 and abs(plain.mean(axis=(2, 3)).std() - 1 / 16) < 0.01
    offset = np.asarray(sample_noise(jax.random.key(0), shape, offset=0.3))
    means = offset.mean(axis=(2, 3))  # (256, 3, 4): one draw per image and channel
    assert abs(means.std() - np.sqrt(1 / 256 + 0.3**2)) < 0.02
    # The offset is constant over each image: removing the per-image mean leaves plain-looking noise.
    assert abs((offset - means[:, :, None, None]).std() - 1.0) < 0.01


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_matches_diffusers(prediction_type):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 4), np.float32), rng.standard_normal((2, 3, 4, 4, 4), np.float32)
    t = np.array([[0, 500, 999], [17, 17, 17]], np.int32)
    got = np.asarray(training_target(make_schedule(), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), prediction_type))
    if prediction_type == "v_prediction":
        # diffusers' get_velocity takes one timestep per leading item: flatten (B, L) into its batch.
        want = ref.get_velocity(torch.from_numpy(x0.reshape(6, 4, 4, 4)), torch.from_numpy(noise.reshape(6, 4, 4, 4)),
                                torch.from_numpy(t.reshape(6)).long()).numpy().reshape(x0.shape)
    else:
        want = noise if prediction_type == "epsilon" else x0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(make_schedule(), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), "velocity")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_matches_diffusers(prediction_type):
    from diffusers.training_utils import compute_snr

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = np.array([[0, 100, 500], [700, 999, 17]], np.int32)
    snr = compute_snr(ref, torch.from_numpy(t).long()).numpy()
    # diffusers' train_text_to_image.py: min(snr, gamma), divided by snr (epsilon) or snr + 1 (v_prediction).
    x0_weight = np.minimum(snr, 5.0)
    want = {"epsilon": x0_weight / snr, "v_prediction": x0_weight / (snr + 1), "sample": x0_weight}[prediction_type]
    got = np.asarray(min_snr_weight(make_schedule(), jnp.asarray(t), prediction_type, 5.0))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.min() < 0.99  # some timestep is weighted down
    np.testing.assert_array_equal(np.asarray(min_snr_weight(make_schedule(), jnp.asarray(t), prediction_type, 0.0)), 1.0)


def test_scheduler_config_is_a_diffusers_ddim_config():
    config = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction")
    ref = DDIMScheduler.from_config(config.to_diffusers_config())
    assert ref.config.prediction_type == "v_prediction" and ref.config.steps_offset == 1 and not ref.config.set_alpha_to_one
    np.testing.assert_allclose(np.asarray(config.make_schedule().alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    assert SchedulerConfig.from_diffusers_config(dict(ref.config)) == config
    # SD 1.5's own scheduler config names no prediction type: epsilon.
    assert SchedulerConfig.from_diffusers_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True}) == SchedulerConfig()
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        SchedulerConfig.from_diffusers_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="prediction_type"):
        SchedulerConfig(prediction_type="velocity")
