"""`config.train.cache_latents`: each record encoded once, and training on the cache is training on the VAE's latents.

The end-to-end test trains the micro SD for a few steps with and without the cache from the same seed: the step
sees the same latents either way, so the losses agree to float32 rounding (the VAE runs in its own jitted program
rather than inside the step, which may order its sums differently); the cached run then resumes for more steps.
"""

import json

import jax
import numpy as np
import pytest
from train_support import make_micro_sd_and_data, micro_config

from layerdiff_jax.data.loader import RECORD_KEY, batch_shapes
from layerdiff_jax.training.config import ConfigError, validate_config
from layerdiff_jax.training.latent_cache import LATENTS, LatentCache, cache_bytes, check_fits, with_latents
from layerdiff_jax.training.trainer import train


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_training_on_cached_latents_is_training_on_the_vaes_latents(tmp_path):
    sd_path, data_path = make_micro_sd_and_data(tmp_path)
    losses = {}
    for cached in (False, True):
        # 32 records, batch 4: steps 9-12 read the second epoch, all from the cache.
        config = micro_config(sd_path, data_path, num_steps=12, sample_posterior=False, cache_latents=cached)
        workdir = tmp_path / f"cached_{cached}"
        train(config, workdir)
        losses[cached] = _losses(workdir)
    assert len(losses[True]) == 12
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)

    # A run with the cache resumes from its checkpoint (the loader's position included) for more steps.
    config.train.num_steps = 14
    result = train(config, workdir)
    assert result.step == 14 and len(_losses(workdir)) == 14


def _batch(keys, rng):
    n = len(keys)
    return {
        "images": rng.uniform(-1, 1, (n, 2, 8, 8, 3)).astype(np.float32),
        "masks": rng.uniform(0, 1, (n, 2, 8, 8, 1)).astype(np.float32),
        "layer_valid": np.ones((n, 2), bool),
        RECORD_KEY: np.array(keys, np.int64),
    }


def test_each_record_is_encoded_once_and_served_from_memory_after():
    calls = []

    def encode(scale, images, masks):  # a stand-in VAE: one number per layer from its pixels
        calls.append(images.shape)
        return scale * (images.mean(axis=(2, 3, 4)) + masks.mean(axis=(2, 3, 4)))[:, :, None]

    cache, rng = LatentCache(encode, np.float32(2.0)), np.random.default_rng(0)
    first = _batch([3, 1, 4, 1], rng)  # record 1 twice, as at an epoch boundary
    out = cache(first)
    assert set(out) == {"layer_valid", LATENTS}
    expected = 2 * (first["images"].mean(axis=(2, 3, 4)) + first["masks"].mean(axis=(2, 3, 4)))[:, :, None]
    np.testing.assert_allclose(out[LATENTS][:3], expected[:3], rtol=1e-6)
    np.testing.assert_allclose(out[LATENTS][3], expected[1], rtol=1e-6)  # the record's first row
    assert cache.encoded == 3

    second = _batch([4, 5, 3, 9], rng)  # new pixels for records 4 and 3: the cache keeps the first encoding
    out = cache(second)
    assert cache.encoded == 5
    np.testing.assert_allclose(out[LATENTS][0], expected[2], rtol=1e-6)
    np.testing.assert_allclose(out[LATENTS][2], expected[0], rtol=1e-6)
    cache(_batch([9, 5, 4, 3], rng))
    assert cache.encoded == 5
    assert len(calls) == 1  # traced once: batches with fewer new records are padded to the same shape


def test_the_step_is_compiled_for_latents_in_place_of_pixels():
    shapes = with_latents(batch_shapes(4, 3, 64, 77), (16, 16, 8), np.float32)
    assert "images" not in shapes and "masks" not in shapes
    assert shapes[LATENTS].shape == (4, 3, 16, 16, 8)
    assert shapes["layer_ids"].shape == (4, 3, 77)
    kept = with_latents(batch_shapes(4, 3, 64, 77), (16, 16, 8), np.float32, keep_masks=True)
    assert "images" not in kept and kept["masks"].shape == (4, 3, 64, 64, 1)


def test_masks_stay_beside_the_latents_for_a_loss_that_weights_by_them():
    cache, rng = LatentCache(lambda scale, images, masks: scale * images[..., :1, :1, :1], np.float32(1.0), keep_masks=True), np.random.default_rng(1)
    batch = _batch([0, 1], rng)
    out = cache(batch)
    assert set(out) == {"layer_valid", "masks", LATENTS}
    np.testing.assert_array_equal(out["masks"], batch["masks"])


@pytest.mark.parametrize("field, value", [("sample_posterior", True), ("kind", "text_to_image")])
def test_the_cache_needs_one_latent_per_record(tmp_path, field, value):
    config = micro_config(tmp_path / "sd", tmp_path / "data", sample_posterior=False, cache_latents=True)
    if field == "kind":
        config.model.kind = value
    else:
        config.train[field] = value
    with pytest.raises(ConfigError, match="cache_latents keeps one latent per record"):
        validate_config(config)


def test_a_cache_larger_than_its_share_of_memory_is_refused_before_work():
    nbytes = cache_bytes(10**8, 4, 32, 8, np.float32)
    assert nbytes == 10**8 * 4 * 32 * 32 * 8 * 4
    with pytest.raises(ConfigError, match=r"latents of 100000000 records take 12207\.0 GiB"):
        check_fits(nbytes, f"{10**8} records")
    check_fits(cache_bytes(32, 4, 16, 8, np.float32), "32 records")
    assert jax.devices()  # the check itself touched no device
