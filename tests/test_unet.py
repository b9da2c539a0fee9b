"""UNet2DConditionModel: parity with diffusers' torch UNet, loading, SD-1.5 size, strictness, bf16, layer_block hook."""

import shutil
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import save_file

from layerdiff_jax.convert import core
from layerdiff_jax.convert.unet import abstract_unet_params, load_unet, rename
from layerdiff_jax.models import cpu_kernels
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig, broadcast_timesteps

# SD-1.5's block types at small widths; per-block heads and transformer depths check the up path's mirroring.
TINY = dict(
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=(2, 4, 2, 4),  # diffusers' legacy name: heads per block
    sample_size=16,
)
# Another arrangement of the same block types, with deeper transformers, run on latents whose sizes halve to
# odd numbers (10x14 -> 5x7 -> 3x4 and back) and float timesteps.
SMALL = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=16,
    norm_num_groups=4,
    attention_head_dim=2,
    transformer_layers_per_block=(1, 1, 2),
)
# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _torch_unet(config: dict, seed: int) -> TorchUNet:
    """Random normal weights everywhere, so zero-initialised layers (proj_out, conv_out, ...) are tested too."""
    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model


def _torch_forward(model, latents, timesteps, context):
    with torch.no_grad():
        out = model(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(timesteps), torch.from_numpy(context))
    return out.sample.permute(0, 2, 3, 1).numpy()


def _inputs(seed, size, width, batch=2, tokens=7):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, *size, 4)).astype(np.float32)
    return latents, rng.standard_normal((batch, tokens, width)).astype(np.float32)


def _jitted(unet):
    return jax.jit(lambda params, *args: unet.apply({"params": params}, *args))


def _saved_and_loaded(config, seed, folder):
    """A torch UNet saved to `folder` and loaded from it: (torch model, folder, unet, params, jitted apply)."""
    model = _torch_unet(config, seed=seed)
    model.save_pretrained(folder)
    unet, params = load_unet(folder)
    return model, folder, unet, params, _jitted(unet)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _saved_and_loaded(TINY, 0, tmp_path_factory.mktemp("unet"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _saved_and_loaded(SMALL, 1, tmp_path_factory.mktemp("unet_small"))


# The SMALL model's inputs in every test that runs it, so its float32 forward compiles once.
SMALL_LATENTS, SMALL_CONTEXT = _inputs(1, (10, 14), SMALL["cross_attention_dim"])
SMALL_TIMESTEPS = np.array([0.5, 750.25], np.float32)


@pytest.mark.parametrize("timesteps", [np.array([0, 999]), np.array([10, 481])])
def test_matches_diffusers_torch_unet(tiny, timesteps):
    model, _, unet, params, apply = tiny
    assert set(params) >= {"conv_in", "time_embedding", "down_blocks_0", "mid_block", "up_blocks_3", "conv_out"}
    latents, context = _inputs(0, (16, 24), TINY["cross_attention_dim"])
    ours = np.asarray(apply(params, latents, timesteps, context))
    ref = _torch_forward(model, latents, timesteps, context)
    assert ours.shape == ref.shape == (2, 16, 24, 4)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_odd_latent_sizes_float_timesteps_and_another_block_arrangement(small):
    model, _, _, params, apply = small
    ours = np.asarray(apply(params, SMALL_LATENTS, SMALL_TIMESTEPS, SMALL_CONTEXT))
    ref = _torch_forward(model, SMALL_LATENTS, SMALL_TIMESTEPS, SMALL_CONTEXT)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("source", ["diffusion_pytorch_model.bin", "pytorch_model.bin", core.FLAX_PARAMS_FILE])
def test_loads_torch_pickles_and_converted_params(tiny, tmp_path, source):
    model, folder, _, params, _ = tiny
    shutil.copy(folder / core.CONFIG_FILE, tmp_path / core.CONFIG_FILE)
    if source == core.FLAX_PARAMS_FILE:
        core.save_flax_params(params, tmp_path / source)
    else:
        torch.save(model.state_dict(), tmp_path / source)
    _, loaded = load_unet(tmp_path)
    flat, expected = flax.traverse_util.flatten_dict(loaded), flax.traverse_util.flatten_dict(params)
    assert flat.keys() == expected.keys()
    for key, value in expected.items():
        assert flat[key].dtype == np.float32
        np.testing.assert_array_equal(flat[key], value, err_msg="/".join(key))


def test_sd15_config_and_parameter_count():
    assert UNetConfig.from_diffusers_config(SD15_CONFIG) == UNetConfig.sd15()
    assert core.count_params(abstract_unet_params(UNet2DConditionModel(UNetConfig.sd15()))) == 859_520_964


def test_config_round_trips_through_diffusers():
    config = UNetConfig.from_diffusers_config(SMALL)
    assert config.num_attention_heads == (2, 2, 2) and config.layers_per_block == (1, 1, 1)
    assert UNetConfig.from_diffusers_config(config.to_diffusers_config()) == config
    # diffusers builds the same architecture from our config: its state dict converts strictly onto our tree.
    torch_model = TorchUNet(**config.to_diffusers_config())
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    core.convert_state_dict(state, abstract_unet_params(UNet2DConditionModel(config)), rename)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"use_linear_projection": True}, "use_linear_projection"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "down_block_types"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"some_future_field": 1}, "some_future_field"),
        ({"layers_per_block": [2, 2]}, "layers_per_block"),
        ({"up_block_types": ["UpBlock2D"] * 3}, "up block"),
    ],
)
def test_unsupported_configs_are_rejected_by_name(change, field):
    with pytest.raises(ValueError, match=field):
        UNetConfig.from_diffusers_config({**SD15_CONFIG, **change})


@pytest.mark.parametrize("corruption", ["missing", "extra", "wrong_shape"])
def test_corrupted_checkpoint_names_the_key(tiny, tmp_path, corruption):
    model, folder, *_ = tiny
    shutil.copy(folder / core.CONFIG_FILE, tmp_path / core.CONFIG_FILE)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if corruption == "missing":
        del state["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
        expected = "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
    elif corruption == "extra":
        state["mid_block.attentions.0.extra.weight"] = np.zeros(3, np.float32)
        expected = "mid_block.attentions.0.extra.weight"
    else:
        state["up_blocks.2.resnets.1.conv1.weight"] = np.zeros((64, 7, 3, 3), np.float32)
        expected = "up_blocks.2.resnets.1.conv1.weight"
    save_file(state, str(tmp_path / WEIGHTS))
    with pytest.raises(core.ConversionError, match=expected):
        load_unet(tmp_path)


def test_bfloat16_compute_is_close_to_float32(small):
    _, folder, _, params, apply = small
    unet_bf16, params_bf16 = load_unet(folder, dtype=jnp.bfloat16)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params_bf16))
    out = _jitted(unet_bf16)(params_bf16, SMALL_LATENTS, SMALL_TIMESTEPS, SMALL_CONTEXT)
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(apply(params, SMALL_LATENTS, SMALL_TIMESTEPS, SMALL_CONTEXT))
    rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    assert rel < 5e-2, rel


def test_timestep_broadcasting_and_input_checks(small):
    *_, unet, params, _ = small
    np.testing.assert_array_equal(broadcast_timesteps(5, 3), [5, 5, 5])
    np.testing.assert_array_equal(broadcast_timesteps(np.array([2.5]), 2), [2.5, 2.5])
    with pytest.raises(ValueError, match="timesteps"):
        broadcast_timesteps(np.array([1, 2]), 3)
    latents, context = _inputs(0, (8, 8), SMALL["cross_attention_dim"])
    with pytest.raises(ValueError, match="latents"):
        jax.eval_shape(lambda: unet.apply({"params": params}, latents[..., :3], 1, context))
    with pytest.raises(ValueError, match="context"):
        jax.eval_shape(lambda: unet.apply({"params": params}, latents, 1, context[..., :5]))


class _Recorder(nn.Module):
    """A layer block that records its arguments and adds `layer_inputs["shift"]` times a learned scale."""

    channels: int
    num_heads: int
    record: Callable = lambda call: None

    @nn.compact
    def __call__(self, h, layer_inputs):
        self.record((self.name, self.channels, self.num_heads, h.shape))
        scale = self.param("scale", nn.initializers.ones, (self.channels,))
        return h + layer_inputs["shift"] * scale


def test_layer_block_follows_every_spatial_transformer():
    calls = []
    config = UNetConfig.from_diffusers_config(TINY)
    unet = UNet2DConditionModel(config, layer_block=lambda **kw: _Recorder(record=calls.append, **kw))
    latents, context = _inputs(0, (16, 24), TINY["cross_attention_dim"])
    variables = jax.eval_shape(unet.init, jax.random.key(0), latents, np.array([1, 2]), context, layer_inputs={"shift": 0.0})
    assert len(calls) == 2 * 3 + 1 + 3 * 3  # SD-1.5's 16 spatial transformers at layers_per_block=2
    paths = {"/".join(k[:-1]) for k in flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"])) if "layer_attentions" in "/".join(k)}
    expected = (
        {f"down_blocks_{b}/layer_attentions_{i}" for b in range(3) for i in range(2)}
        | {"mid_block/layer_attentions_0"}
        | {f"up_blocks_{b}/layer_attentions_{i}" for b in (1, 2, 3) for i in range(3)}
    )
    assert paths == expected
    # In call order, each block's width, heads (the up blocks mirror the down blocks' (2, 4, 2, 4); the mid
    # block takes the last) and activation shape.
    down = [(32, 2, (16, 24))] * 2 + [(64, 4, (8, 12))] * 2 + [(64, 2, (4, 6))] * 2
    up = [(64, 2, (4, 6))] * 3 + [(64, 4, (8, 12))] * 3 + [(32, 2, (16, 24))] * 3
    assert [(c, h, shape[1:3]) for _, c, h, shape in calls] == down + [(64, 4, (2, 3))] + up
    assert all(shape[0] == 2 and shape[3] == c for _, c, _, shape in calls)
    # Without the hook the tree is exactly diffusers' (checked by the parity tests) plus nothing else.
    plain = abstract_unet_params(UNet2DConditionModel(config))
    hooked = {k: v for k, v in flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"])).items() if "layer_attentions" not in "/".join(k)}
    assert hooked.keys() == flax.traverse_util.flatten_dict(plain).keys()


def test_layer_block_output_is_used_and_remat_matches(small):
    """With remat on, the hooked UNet equals the plain one when the hook adds zero, and differs otherwise."""
    *_, unet, params, plain_apply = small
    hooked = UNet2DConditionModel(unet.config, remat=True, layer_block=_Recorder)
    latents, timesteps, context = SMALL_LATENTS, SMALL_TIMESTEPS, SMALL_CONTEXT
    shapes = jax.eval_shape(hooked.init, jax.random.key(0), latents, timesteps, context, layer_inputs={"shift": 0.0})
    flat = flax.traverse_util.flatten_dict(params)
    flat.update({k: np.ones(v.shape, np.float32) for k, v in flax.traverse_util.flatten_dict(nn.meta.unbox(shapes["params"])).items() if k not in flat})
    hooked_params = flax.traverse_util.unflatten_dict(flat)
    apply = jax.jit(lambda p, shift: hooked.apply({"params": p}, latents, timesteps, context, layer_inputs={"shift": shift}))
    base = np.asarray(plain_apply(params, latents, timesteps, context))
    np.testing.assert_allclose(np.asarray(apply(hooked_params, 0.0)), base, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(apply(hooked_params, 1.0)) - base).max() > 1e-2
    # The backward pass traces through the rematerialised blocks.
    grads = jax.eval_shape(jax.grad(lambda p: apply(p, 0.0).sum()), hooked_params)
    assert jax.tree.structure(grads) == jax.tree.structure(hooked_params)


def test_fused_cpu_kernels_and_plain_xla_ops_both_match_torch(small, monkeypatch):
    """The UNet with attention_impl="cpu" and its GroupNorms fused, as "auto" runs it on CPUs (the kernels'
    gradients are checked against torch's in tests/test_attention.py and tests/test_cpu_kernels.py), and with
    plain XLA ops throughout, as it runs where the kernels cannot be built and, but for attention, on GPUs."""
    model, _, unet, params, _ = small
    args = (SMALL_LATENTS, SMALL_TIMESTEPS, SMALL_CONTEXT)
    want = _torch_forward(model, *args)
    fused = unet.clone(attention_impl="cpu")
    text = jax.jit(lambda p: fused.apply({"params": p}, *args)).lower(params).as_text()
    assert "layerdiff_cpu_attention_forward" in text and "layerdiff_cpu_group_norm_forward" in text
    np.testing.assert_allclose(jax.jit(lambda p: fused.apply({"params": p}, *args))(params), want, rtol=0, atol=1e-4)

    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "no C++ compiler ('g++'; set CXX)")
    plain = jax.jit(lambda p: unet.clone(attention_impl="auto").apply({"params": p}, *args))
    assert "layerdiff_cpu" not in plain.lower(params).as_text()
    np.testing.assert_allclose(plain(params), want, rtol=0, atol=1e-4)
