"""Layer-aware negative prompts and batched classifier-free guidance, with a stub conditional model."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerdiff_jax.diffusion.ddim import ddim_sample, ddim_timesteps
from layerdiff_jax.diffusion.guidance import classifier_free_guidance, guided_model_fn, layer_aware_negatives
from layerdiff_jax.diffusion.schedules import make_schedule

DIM = 4  # toy embedding width == latent channels, so the stub can add embeddings to latents


def embed(prompt: str) -> np.ndarray:
    """Toy text encoder: a fixed pseudo-random vector per prompt string."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def conditions(global_prompts, layer_prompts):
    return {
        "global": jnp.asarray(np.stack([embed(g) for g in global_prompts])),
        "layers": jnp.asarray(np.stack([[embed(p) for p in ps] for ps in layer_prompts])),
    }


calls = []


def stub_apply(x, t, cond):
    """Conditional 'UNet': each layer's output depends on its latent, its timestep, its layer prompt
    and the global prompt."""
    calls.append(x.shape[0])
    tt = (t / 1000.0)[:, :, None, None, None]
    return jnp.sin(x) * tt + cond["layers"][:, :, None, None, :] + 0.5 * cond["global"][:, None, None, None, :]


def test_layer_aware_negatives():
    neg_global, neg_layers = layer_aware_negatives(["the background", "a cat", "a red ball"])
    assert neg_global == "a cat, a red ball"
    assert neg_layers == ["a cat, a red ball", "the background", "the background"]
    assert layer_aware_negatives(["a beach at sunset", "a dog"]) == ("a dog", ["a dog", "the background"])
    assert layer_aware_negatives(["the background"]) == ("", [""])
    with pytest.raises(ValueError, match="background prompt"):
        layer_aware_negatives([])
    with pytest.raises(TypeError, match="strings"):
        layer_aware_negatives(["the background", None])


def test_classifier_free_guidance_formula():
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
    np.testing.assert_allclose(classifier_free_guidance(c, u, 3.0), [2.0, 8.0])
    np.testing.assert_array_equal(classifier_free_guidance(c, u, 1.0), c)
    np.testing.assert_array_equal(classifier_free_guidance(c, u, 0.0), u)


def test_guided_model_uses_layer_aware_negatives_in_one_call():
    requests = [
        ("a cat playing with a red ball on a lawn", ["the background", "a cat", "a red ball"]),
        ("a lamp on a desk in a study", ["a study room", "a desk", "a lamp"]),
    ]
    negatives = [layer_aware_negatives(layers) for _, layers in requests]
    cond = conditions([g for g, _ in requests], [layers for _, layers in requests])
    uncond = conditions([ng for ng, _ in negatives], [nl for _, nl in negatives])
    B, L, scale = 2, 3, 3.0
    x = jax.random.normal(jax.random.key(0), (B, L, 4, 4, DIM))
    t = jnp.array([[981, 981, 981], [1, 501, 1]], jnp.int32)

    calls.clear()
    guided = guided_model_fn(stub_apply, cond, uncond, scale)(x, t)
    assert calls == [2 * B], "cond and uncond must share one batched model call"

    # Unconditional conditions spelled out per layer, independently of layer_aware_negatives.
    expected_uncond = {
        "global": jnp.asarray(np.stack([embed("a cat, a red ball"), embed("a desk, a lamp")])),
        "layers": jnp.asarray(np.stack([
            [embed("a cat, a red ball"), embed("the background"), embed("the background")],
            [embed("a desk, a lamp"), embed("the background"), embed("the background")],
        ])),
    }
    eps_c, eps_u = stub_apply(x, t, cond), stub_apply(x, t, expected_uncond)
    assert np.abs(np.asarray(eps_c - eps_u)).min() > 0  # every layer's negative actually differs
    np.testing.assert_allclose(np.asarray(guided), np.asarray(eps_u + scale * (eps_c - eps_u)), rtol=0, atol=1e-6)


def test_guided_sampling_in_jitted_scan():
    B, L = 1, 2
    cond = conditions(["a dog on a beach"], [["the background", "a dog"]])
    ng, nl = layer_aware_negatives(["the background", "a dog"])
    uncond = conditions([ng], [nl])
    x_T = jax.random.normal(jax.random.key(1), (B, L, 4, 4, DIM))
    ts, sched = ddim_timesteps(5), make_schedule()

    @jax.jit
    def sample(x, c, u):
        return ddim_sample(guided_model_fn(stub_apply, c, u, 3.0), x, ts, sched)

    def two_calls(x, t):
        return classifier_free_guidance(stub_apply(x, t, cond), stub_apply(x, t, uncond), 3.0)

    np.testing.assert_allclose(np.asarray(sample(x_T, cond, uncond)),
                               np.asarray(ddim_sample(two_calls, x_T, ts, sched)), rtol=0, atol=1e-5)


def test_guided_model_rejects_mismatched_conditions():
    cond = conditions(["a"], [["the background", "b"]])
    with pytest.raises(ValueError, match="same structure"):
        guided_model_fn(stub_apply, cond, {"global": cond["global"]}, 3.0)
    with pytest.raises(ValueError, match="leaf shape"):
        guided_model_fn(stub_apply, cond, conditions(["a"], [["the background"]]), 3.0)
    fn = guided_model_fn(stub_apply, cond, cond, 3.0)
    with pytest.raises(ValueError, match="must lead with batch 2"):
        fn(jnp.zeros((2, 2, 4, 4, DIM)), jnp.ones((2, 2), jnp.int32))
