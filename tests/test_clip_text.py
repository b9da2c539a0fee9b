"""CLIP text transformer: parity with transformers' torch CLIPTextModel, SD-1.5 size, strict loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from layerdiff_jax.convert import core
from layerdiff_jax.convert.clip_text import abstract_text_encoder_params, load_text_encoder, rename_text_encoder_key
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
    with torch.no_grad():  # perturb layer-norm scales/biases, which start at exactly 1 and 0
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
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
    params = abstract_text_encoder_params(CLIPTextTransformer(CLIPTextConfig.sd15()))
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) == 123_060_480


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
    save_file(weights, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, prefixed = load_text_encoder(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, prefixed, params)
    assert rename_text_encoder_key("text_model.encoder.layers.3.self_attn.out_proj.weight") == "encoder.layers.3.self_attn.to_out.0.weight"


def test_torch_bin_and_converted_params_load(torch_clip, tmp_path):
    model, folder = torch_clip
    _, params = load_text_encoder(folder)
    bin_dir, flax_dir = tmp_path / "bin", tmp_path / "flax"
    for d in (bin_dir, flax_dir):
        d.mkdir()
        (d / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    core.save_flax_params(params, flax_dir / core.FLAX_PARAMS_FILE)
    for d in (bin_dir, flax_dir):
        _, reloaded = load_text_encoder(d)
        jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)


@pytest.mark.parametrize("corruption", ["missing", "extra", "shape"])
def test_corrupted_checkpoint_names_the_key(torch_clip, tmp_path, corruption):
    _, folder = torch_clip
    weights = load_file(folder / WEIGHTS)
    key = "encoder.layers.1.mlp.fc2.weight"
    if corruption == "missing":
        del weights[key]
        key = "encoder/layers_1/mlp/fc2/kernel"  # a missing parameter is named by its Flax path
    elif corruption == "extra":
        key = "encoder.layers.1.mlp.fc3.weight"
        weights[key] = np.zeros((4, 4), np.float32)
    else:
        weights[key] = weights[key][:-1]
    save_file(weights, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(core.ConversionError, match=key.replace(".", r"\.")):
        load_text_encoder(tmp_path)
