"""CLIP text transformer: parity with transformers' torch CLIPTextModel, SD-1.5 size, strict loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from checkpoint_support import (
    assert_bin_and_flax_params_load,
    assert_corruption_is_named,
    copy_with_weights,
    perturb_vectors,
)
from safetensors.numpy import load_file

from layerdiff_jax.convert.clip_text import abstract_text_encoder_params, load_text_encoder, rename_text_encoder_key
from layerdiff_jax.convert.core import count_params
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer

TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=2,
)
WEIGHTS = "model.safetensors"


def _torch_clip(folder, hidden_act="quick_gelu", seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act)).eval()
    perturb_vectors(model, seed)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def torch_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_encoder")
    return _torch_clip(folder), folder


@pytest.fixture(scope="module")
def input_ids():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 77)).astype(np.int32)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_last_hidden_state_matches_transformers(tmp_path, input_ids, hidden_act):
    model = _torch_clip(tmp_path, hidden_act)
    text, params = load_text_encoder(tmp_path)
    assert text.config.hidden_act == hidden_act
    with torch.no_grad():
        expected = model(torch.from_numpy(input_ids).long()).last_hidden_state.numpy()
    hidden = jax.jit(lambda p, ids: text.apply({"params": p}, ids))(params, input_ids)
    assert hidden.shape == (2, 77, 64)
    err = np.abs(np.asarray(hidden) - expected).max()
    print(f"CLIP text ({hidden_act}) last_hidden_state max abs err: {err:.2e}")
    assert err <= 1e-4


def test_shorter_inputs_are_causal_prefixes(torch_clip, input_ids):
    text, params = load_text_encoder(torch_clip[1])
    full = text.apply({"params": params}, input_ids)
    prefix = text.apply({"params": params}, input_ids[:, :10])
    np.testing.assert_allclose(prefix, full[:, :10], atol=1e-5)


def test_too_many_tokens_is_a_clear_error(torch_clip):
    text, params = load_text_encoder(torch_clip[1])
    with pytest.raises(ValueError, match="max_position_embeddings=77"):
        text.apply({"params": params}, np.zeros((1, 78), np.int32))


def test_bfloat16_compute_tracks_float32(torch_clip, input_ids):
    text, params = load_text_encoder(torch_clip[1])
    text16, params16 = load_text_encoder(torch_clip[1], dtype=jnp.bfloat16)
    full = text.apply({"params": params}, input_ids)
    half = text16.apply({"params": params16}, input_ids)
    assert half.dtype == jnp.float32 and bool(jnp.isfinite(half).all())
    rel = float(jnp.abs(half - full).max() / jnp.abs(full).max())
    assert rel < 0.05, rel


def test_sd15_parameter_count():
    assert count_params(abstract_text_encoder_params(CLIPTextTransformer(CLIPTextConfig.sd15()))) == 123_060_480


def test_config_round_trip_through_transformers():
    for cfg in (CLIPTextConfig.sd15(), CLIPTextConfig(**{k: v for k, v in TINY.items() if not k.endswith("token_id")})):
        torch_cfg = transformers.CLIPTextConfig(**cfg.to_diffusers_config())
        assert CLIPTextConfig.from_diffusers_config(torch_cfg.to_dict()) == cfg
    sd15 = CLIPTextConfig.sd15()
    assert (sd15.vocab_size, sd15.hidden_size, sd15.num_hidden_layers, sd15.num_attention_heads) == (49408, 768, 12, 12)


@pytest.mark.parametrize(
    "overrides, field",
    [({"hidden_act": "relu"}, "hidden_act"), ({"model_type": "clip_vision_model"}, "model_type"), ({"num_attention_heads": 5}, "num_attention_heads")],
)
def test_unsupported_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        CLIPTextConfig.from_diffusers_config({**TINY, **overrides})


def test_transformers4_prefixed_keys_and_position_ids_load(torch_clip, tmp_path):
    """SD-1.5 downloads (transformers 4) prefix keys with `text_model.` and store the position_ids buffer."""
    _, folder = torch_clip
    _, params = load_text_encoder(folder)
    weights = {f"text_model.{k}": v for k, v in load_file(folder / WEIGHTS).items()}
    weights["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    copy_with_weights(folder, tmp_path, WEIGHTS, weights)
    _, prefixed = load_text_encoder(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, prefixed, params)
    assert rename_text_encoder_key("text_model.encoder.layers.3.self_attn.out_proj.weight") == "encoder.layers.3.self_attn.to_out.0.weight"


def test_torch_bin_and_converted_params_load(torch_clip, tmp_path):
    model, folder = torch_clip
    _, params = load_text_encoder(folder)
    assert_bin_and_flax_params_load(model, folder, params, load_text_encoder, "pytorch_model.bin", tmp_path)


@pytest.mark.parametrize("corruption", ["missing", "extra", "shape"])
def test_corrupted_checkpoint_names_the_key(torch_clip, tmp_path, corruption):
    key, flax_path = "encoder.layers.1.mlp.fc2.weight", "encoder/layers_1/mlp/fc2/kernel"
    assert_corruption_is_named(torch_clip[1], tmp_path, WEIGHTS, load_text_encoder, key, flax_path, corruption)
