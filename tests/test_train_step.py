"""Pieces of the train step: latent layout, prompt dropout, the loss over valid layers and its weights inside objects,
the lr schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_support import WIDTH, random_params

from layerdiff_jax.diffusion.schedules import make_schedule
from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet
from layerdiff_jax.models.unet import UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig, encode_layers
from layerdiff_jax.training.config import base_config
from layerdiff_jax.training.state import learning_rate_schedule
from layerdiff_jax.training.step import diffusion_loss, drop_prompts, object_weights

RNG = np.random.default_rng(0)


def test_latents_are_image_then_mask_per_layer():
    vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8))
    params = random_params(vae, (jnp.zeros((1, 4, 4, 3)),), RNG)
    images = RNG.uniform(-1, 1, (2, 3, 8, 8, 3)).astype(np.float32)
    masks = RNG.uniform(0, 1, (2, 3, 8, 8, 1)).astype(np.float32)
    latents = np.asarray(encode_layers(vae, params, images, masks))
    assert latents.shape == (2, 3, 4, 4, 8)
    encode = lambda x: np.asarray(vae.apply({"params": params}, x, method=AutoencoderKL.encode_latents))  # noqa: E731
    for b in range(2):
        np.testing.assert_allclose(latents[b, ..., :4], encode(images[b]), atol=1e-5)
        np.testing.assert_allclose(latents[b, ..., 4:], encode(np.repeat(masks[b], 3, axis=-1) * 2 - 1), atol=1e-5)


def test_prompt_dropout_rates_and_independence():
    batch, layers = 4000, 3
    global_context = jnp.ones((batch, 5, 2))
    layer_context = jnp.ones((batch, layers, 5, 2))
    empty = jnp.zeros((5, 2))
    g, l = drop_prompts(jax.random.key(0), global_context, layer_context, empty, 0.3, 0.1)
    dropped_g = np.asarray(g[:, 0, 0] == 0)
    dropped_l = np.asarray(l[:, :, 0, 0] == 0)
    assert (dropped_l == dropped_l[:, :1]).all(), "a sample's layer prompts drop together"
    assert abs(dropped_g.mean() - 0.3) < 0.03 and abs(dropped_l[:, 0].mean() - 0.1) < 0.02
    assert abs((dropped_g & dropped_l[:, 0]).mean() - 0.03) < 0.015, "global and layer dropout are independent"
    g, l = drop_prompts(jax.random.key(0), global_context, layer_context, empty, 0.0, 0.0)
    assert (np.asarray(g) == 1).all() and (np.asarray(l) == 1).all()


@pytest.fixture(scope="module")
def micro_layerdiff():
    unet = UNetConfig(
        block_out_channels=(WIDTH,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
        layers_per_block=1, num_attention_heads=2, cross_attention_dim=WIDTH, norm_num_groups=8,
    )
    model = LayerDiffUNet(unet, LayerDiffConfig(max_layers=3, enhancer_heads=2))
    # Random everywhere (no zero-initialised blocks), so layers really interact.
    return model, random_params(model, model.example_inputs(num_layers=3, context_length=6), RNG)


def test_loss_ignores_padded_layers(micro_layerdiff):
    model, params = micro_layerdiff
    schedule = make_schedule()
    loss = jax.jit(lambda latents, layer_context, valid: diffusion_loss(
        model, params, latents, jnp.ones((2, 6, WIDTH)), layer_context, valid, jax.random.key(1), schedule, 0.5
    ))
    latents = RNG.normal(size=(2, 3, 4, 4, 8)).astype(np.float32)
    context = RNG.normal(size=(2, 3, 6, WIDTH)).astype(np.float32)
    valid = np.array([[True, True, False], [True, True, True]])
    base, parts = loss(latents, context, valid)
    changed_latents, changed_context = latents.copy(), context.copy()
    changed_latents[0, 2] = 5.0  # sample 0's padded layer: other content, other prompt
    changed_context[0, 2] = -3.0
    np.testing.assert_allclose(loss(changed_latents, changed_context, valid)[0], base, rtol=1e-6)
    assert abs(float(loss(changed_latents, changed_context, np.ones((2, 3), bool))[0]) - float(base)) > 1e-3
    np.testing.assert_allclose(float(base), (float(parts["loss_image"]) + float(parts["loss_mask"])) / 2, rtol=1e-6)


def test_object_weights_favour_each_foregrounds_mask_at_mean_one():
    masks = np.zeros((1, 3, 8, 8, 1), np.float32)
    masks[0, 0] = 1.0  # the background layer's mask: never weighted
    masks[0, 1, :4, :4] = 1.0  # layer 1's object fills the top-left latent's footprint (4x4 pixels of a 2x2 grid)
    masks[0, 2, :2, :2] = 1.0  # layer 2's fills a quarter of it
    weights = np.asarray(object_weights(jnp.asarray(masks), 2, 3.0))
    assert weights.shape == (1, 3, 2, 2, 1)
    np.testing.assert_allclose(weights.mean(axis=(2, 3, 4)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[0, 0], 1.0)
    # Layer 1: 1 + 3 at its object's latent, 1 elsewhere, over a mean of 7 / 4.
    np.testing.assert_allclose(weights[0, 1, :, :, 0], np.array([[4, 1], [1, 1]]) / 1.75, rtol=1e-6)
    # Layer 2: the object covers a quarter of its latent's footprint.
    np.testing.assert_allclose(weights[0, 2, :, :, 0], np.array([[1.75, 1], [1, 1]]) / (4.75 / 4), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(object_weights(jnp.asarray(masks), 2, 0.0)), 1.0)


def test_object_weights_move_the_image_loss_only(micro_layerdiff):
    model, params = micro_layerdiff
    schedule = make_schedule()
    loss = jax.jit(lambda latents, weights: diffusion_loss(
        model, params, latents, jnp.ones((2, 6, WIDTH)), jnp.ones((2, 3, 6, WIDTH)), jnp.ones((2, 3), bool),
        jax.random.key(1), schedule, 0.5, image_weights=weights,
    ))
    latents = RNG.normal(size=(2, 3, 4, 4, 8)).astype(np.float32)
    plain, plain_parts = loss(latents, None)
    ones, _ = loss(latents, jnp.ones((2, 3, 4, 4, 1)))
    np.testing.assert_allclose(float(ones), float(plain), rtol=1e-6)
    weights = np.ones((2, 3, 4, 4, 1), np.float32)
    weights[:, 1:, :2] = 1.8
    weights[:, 1:, 2:] = 0.2  # mean 1 per layer, the error's positions weighted unevenly
    _, parts = loss(latents, jnp.asarray(weights))
    assert abs(float(parts["loss_image"]) - float(plain_parts["loss_image"])) > 1e-4
    np.testing.assert_allclose(float(parts["loss_mask"]), float(plain_parts["loss_mask"]), rtol=1e-6)


def test_warmup_then_constant_learning_rate():
    train = base_config().train
    schedule = learning_rate_schedule(train)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(250)), 0.5e-5, rtol=1e-6)
    np.testing.assert_allclose([float(schedule(s)) for s in (500, 501, 10_000)], [1e-5] * 3, rtol=1e-6)
    train.warmup_steps = 0
    assert float(learning_rate_schedule(train)(0)) == pytest.approx(1e-5)


def test_cooldown_decays_linearly_to_zero_over_the_last_steps():
    train = base_config().train
    train.num_steps, train.warmup_steps, train.cooldown_steps = 3_700, 200, 1_000
    schedule = learning_rate_schedule(train)
    got = [float(schedule(s)) for s in (100, 200, 2_700, 3_200, 3_700)]
    np.testing.assert_allclose(got, [0.5e-5, 1e-5, 1e-5, 0.5e-5, 0.0], rtol=1e-6, atol=1e-12)
    train.warmup_steps, train.cooldown_steps = 0, 3_700  # all decay
    np.testing.assert_allclose([float(learning_rate_schedule(train)(s)) for s in (0, 1_850)], [1e-5, 0.5e-5], rtol=1e-6)


def test_ema_decay_warms_up_then_holds():
    from layerdiff_jax.training.step import ema_decay

    decays = [float(ema_decay(jnp.asarray(step), 0.999)) for step in (0, 10, 990, 100_000)]
    np.testing.assert_allclose(decays, [0.1, 11 / 20, 0.991, 0.999], rtol=1e-6)


def test_cpu_convolutions_without_ynnpack_compute_the_same_gradients():
    """`train.cpu_ynn_convolutions = False` (the demo's setting) is an XLA option this jaxlib accepts, and a
    convolution's gradients under it equal XLA's default ones up to float32 summation order (the weight
    gradient sums 1,024 products per element; they differ by a few 1e-5)."""
    from layerdiff_jax.training.step import compiler_options

    train = base_config().train
    assert compiler_options(train) is None
    train.cpu_ynn_convolutions = False
    options = compiler_options(train)
    assert options is not None

    def loss(x, k):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) ** 2)

    args = (jnp.asarray(RNG.standard_normal((4, 16, 16, 32)), jnp.float32), jnp.asarray(RNG.standard_normal((3, 3, 32, 32)), jnp.float32) * 0.05)
    grad = jax.grad(loss, argnums=(0, 1))
    default, without = jax.jit(grad)(*args), jax.jit(grad, compiler_options=options)(*args)
    for a, b in zip(default, without):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)
