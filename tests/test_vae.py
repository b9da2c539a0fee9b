"""AutoencoderKL: parity with diffusers' torch VAE, SD-1.5 size, strict loading, scaling, bfloat16."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoint_support import (
    assert_bin_and_flax_params_load,
    assert_corruption_is_named,
    copy_with_weights,
    perturb_vectors,
)
from safetensors.numpy import load_file

from layerdiff_jax.convert.core import count_params
from layerdiff_jax.convert.vae import abstract_vae_params, load_vae, rename_vae_key
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig, sample_posterior

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    perturb_vectors(model, 0)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def loaded(torch_vae):
    return load_vae(torch_vae[1])


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_encode_matches_diffusers(torch_vae, loaded, images):
    model, folder = torch_vae
    vae, params = loaded
    with torch.no_grad():
        posterior = model.encode(_nchw(images)).latent_dist
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, images)
    assert mean.shape == (2, 16, 24, 4)
    err_mean = np.abs(np.asarray(mean) - _nhwc(posterior.mean)).max()
    err_logvar = np.abs(np.asarray(logvar) - _nhwc(posterior.logvar)).max()
    print(f"VAE encode max abs err: mean {err_mean:.2e}, logvar {err_logvar:.2e}")
    assert err_mean <= 1e-4 and err_logvar <= 1e-4
    np.testing.assert_allclose(vae.apply({"params": params}, images, method=vae.encode_mean), mean, atol=1e-6)


def test_decode_matches_diffusers(torch_vae, loaded):
    model, _ = torch_vae
    vae, params = loaded
    latents = np.random.default_rng(1).normal(size=(2, 8, 12, 4)).astype(np.float32)
    with torch.no_grad():
        expected = _nhwc(model.decode(_nchw(latents)).sample)
    decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, latents)
    assert decoded.shape == (2, 16, 24, 3)
    err = np.abs(np.asarray(decoded) - expected).max()
    print(f"VAE decode max abs err: {err:.2e}")
    assert err <= 1e-4


def test_scaled_latents_and_sampling(loaded, images):
    vae, params = loaded
    apply = lambda method, *args: vae.apply({"params": params}, *args, method=method)
    mean, logvar = apply(vae.encode, images)
    scaled = apply(vae.encode_latents, images)
    np.testing.assert_allclose(scaled, mean * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(apply(vae.decode_latents, scaled), apply(vae.decode, mean), atol=1e-5)
    rng = jax.random.key(3)
    sampled = apply(vae.encode_latents, images, rng)
    np.testing.assert_allclose(sampled, sample_posterior(mean, logvar, rng) * 0.18215, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(sampled - scaled)).max() > 0  # a sample is not the mean
    # Over many draws the posterior sample's standard deviation is exp(logvar / 2).
    draws = jax.vmap(lambda k: sample_posterior(mean, logvar, k))(jax.random.split(rng, 4000))
    np.testing.assert_allclose(draws.std(0), np.exp(0.5 * logvar), rtol=0.1)


def test_bfloat16_compute_tracks_float32(torch_vae, loaded, images):
    vae, params = loaded
    vae_bf16, params_bf16 = load_vae(torch_vae[1], dtype=jnp.bfloat16)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda p: p.dtype == np.float32, params_bf16))
    mean32 = vae.apply({"params": params}, images, method=vae.encode_mean)
    mean16 = vae_bf16.apply({"params": params_bf16}, images, method=vae_bf16.encode_mean)
    out16 = vae_bf16.apply({"params": params_bf16}, images)
    assert mean16.dtype == out16.dtype == jnp.float32 and bool(jnp.isfinite(out16).all())
    rel = float(jnp.abs(mean16 - mean32).max() / jnp.abs(mean32).max())
    assert rel < 0.05, rel


def test_sd15_parameter_count():
    assert count_params(abstract_vae_params(AutoencoderKL(VAEConfig.sd15()))) == 83_653_863


def test_config_round_trip_through_diffusers():
    cfg = VAEConfig.from_diffusers_config({**TINY, "_class_name": "AutoencoderKL", "force_upcast": True})
    assert cfg.block_out_channels == (32, 64) and cfg.norm_num_groups == 8
    assert VAEConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    sd15 = VAEConfig.sd15().to_diffusers_config()
    torch_cfg = diffusers.AutoencoderKL.from_config(cfg.to_diffusers_config()).config
    assert VAEConfig.from_diffusers_config(dict(torch_cfg)) == cfg
    assert sd15["block_out_channels"] == [128, 256, 512, 512] and sd15["scaling_factor"] == 0.18215


@pytest.mark.parametrize(
    "field, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("act_fn", "gelu"),
        ("shift_factor", 0.1),
        ("mystery_option", 1),
    ],
)
def test_unsupported_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VAEConfig.from_diffusers_config({**TINY, field: value})


def test_old_attention_names_load(torch_vae, loaded, tmp_path):
    _, folder = torch_vae
    _, params = loaded
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(folder / WEIGHTS).items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    copy_with_weights(folder, tmp_path, WEIGHTS, renamed)
    _, old_params = load_vae(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, old_params, params)
    assert rename_vae_key("decoder.mid_block.attentions.0.key.bias") == "decoder.mid_block.attentions.0.to_k.bias"


def test_torch_bin_and_converted_params_load(torch_vae, loaded, tmp_path):
    model, folder = torch_vae
    assert_bin_and_flax_params_load(model, folder, loaded[1], load_vae, "diffusion_pytorch_model.bin", tmp_path)


@pytest.mark.parametrize("corruption", ["missing", "extra", "shape"])
def test_corrupted_checkpoint_names_the_key(torch_vae, tmp_path, corruption):
    key, flax_path = "decoder.up_blocks.1.resnets.0.conv1.weight", "decoder/up_blocks_1/resnets_0/conv1/kernel"
    assert_corruption_is_named(torch_vae[1], tmp_path, WEIGHTS, load_vae, key, flax_path, corruption)


def test_wrong_input_layout_is_a_clear_error(loaded, images):
    vae, params = loaded
    with pytest.raises(ValueError, match="NHWC"):
        vae.apply({"params": params}, images.transpose(0, 3, 1, 2), method=vae.encode)
