"""Fitting the demo's toy VAE: content-preferring crops, the image set, and a fit that lowers the loss."""

import jax
import numpy as np
import pytest

from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.models.init import init_params
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig
from layerdiff_jax.training import autoencoder


def test_collect_images_has_every_layer_mask_and_composite():
    samples = [generate_sample(0, i, resolution=32) for i in range(3)]
    images = autoencoder.collect_images(samples)
    assert images.shape == (sum(2 * s.num_layers for s in samples) + 3, 32, 32, 3)
    np.testing.assert_array_equal(images[-1], samples[-1].composite())


def test_content_crops_prefer_crops_with_content():
    images = np.zeros((100, 32, 32, 3), np.uint8)
    images[:10, 8:24, 8:24] = 200  # 10% of the images have a bright square, the rest are black
    crops = autoencoder.content_crops(images, 64, 16, 0.05, np.random.default_rng(0))
    assert crops.shape == (64, 16, 16, 3)
    with_content = np.mean((crops.max(-1) > 60).mean((1, 2)) >= 0.05)
    plain = autoencoder._random_crops(images, 64, 16, np.random.default_rng(0))
    assert with_content > 0.3 > np.mean((plain.max(-1) > 60).mean((1, 2)) >= 0.05)


def test_fit_vae_lowers_reconstruction_error():
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4))
    images = autoencoder.collect_images(generate_sample(0, i, resolution=16) for i in range(4))
    params = init_params(vae, jax.random.key(0), autoencoder.to_model_range(images[:1]))
    config = autoencoder.VAEFitConfig(steps=40, batch_size=8, crop=16, learning_rate=3e-3)
    params, losses = autoencoder.fit_vae(vae, params, images, config, progress=False)
    assert losses[-1][1] < 0.7 * losses[0][1]
    scale = autoencoder.latent_scaling_factor(vae, params, images)
    assert np.isfinite(scale) and scale > 0


@pytest.mark.parametrize("latent_noise", [0.0, 0.5])
def test_decoder_only_fit_keeps_the_encoder_and_so_the_latent_space(latent_noise):
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4))
    samples = [generate_sample(0, i, resolution=16) for i in range(4)]
    images = np.concatenate([autoencoder.collect_images(samples), autoencoder.single_object_images(samples, seed=0)])
    params = init_params(vae, jax.random.key(0), autoencoder.to_model_range(images[:1]))
    config = autoencoder.VAEFitConfig(
        steps=40, batch_size=8, crop=16, learning_rate=3e-3, decoder_only=True, latent_noise=latent_noise
    )
    tuned, losses = autoencoder.fit_vae(vae, params, images, config, progress=False)
    assert losses[-1][1] < 0.8 * losses[0][1]
    for part in params:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(tuned[part])))
        assert same == (part not in autoencoder.DECODER_PARTS), part


def test_single_object_images_show_one_object_on_a_plain_background_of_another_colour():
    samples = [generate_sample(0, i, resolution=32) for i in range(6)]
    views = autoencoder.single_object_images(samples, seed=0)
    assert views.shape == (sum(s.num_layers > 1 for s in samples), 32, 32, 3)
    for view in views:
        colours, counts = np.unique(view.reshape(-1, 3), axis=0, return_counts=True)
        assert len(colours) == 2 and counts.min() > 0  # hard-edged object and background, different colours
