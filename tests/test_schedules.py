"""Noise schedule, q_sample and training-timestep policy vs diffusers' torch DDPMScheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from layerdiff_jax.diffusion.schedules import add_noise, make_schedule, sample_timesteps


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
