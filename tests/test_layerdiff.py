"""The LayerDiff UNet: identity to SD at initialisation, padding, permutation, gradients, variants, bf16."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet, init_from_sd
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from layerdiff_jax.toy import TEXT_WIDTH, toy_configs

TEXT_LEN, SIZE = 6, 8
TINY = toy_configs(vocab_size=16)["unet"]  # the CPU toy's UNet (the vocabulary does not enter it)


def _randomize(params, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (rng.standard_normal(np.shape(x)) * scale).astype(np.float32), params)


@pytest.fixture(scope="module")
def sd():
    unet = UNet2DConditionModel(TINY)
    params = _randomize(abstract_params(unet, jnp.zeros((1, SIZE, SIZE, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, TEXT_WIDTH))), 0)
    return unet, params


@pytest.fixture(scope="module")
def layerdiff(sd):
    return init_from_sd(*sd, LayerDiffConfig(max_layers=4, enhancer_heads=4), jax.random.key(1))


def _inputs(batch, num_layers, seed=0, valid=None):
    rng = np.random.default_rng(seed)
    return dict(
        latents=rng.normal(size=(batch, num_layers, SIZE, SIZE, 8)).astype(np.float32),
        timesteps=rng.integers(0, 1000, size=(batch, num_layers)),
        global_context=rng.normal(size=(batch, TEXT_LEN, TEXT_WIDTH)).astype(np.float32),
        layer_context=rng.normal(size=(batch, num_layers, TEXT_LEN, TEXT_WIDTH)).astype(np.float32),
        layer_valid=np.ones((batch, num_layers), bool) if valid is None else np.asarray(valid, bool),
    )


def _apply(model, params, inputs):
    return np.asarray(jax.jit(model.apply)({"params": params}, **inputs))


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_fresh_model_is_sd_on_every_layer(sd, layerdiff, num_layers):
    unet, sd_params = sd
    model, params = layerdiff
    inputs = _inputs(2, num_layers, seed=num_layers)
    assert len(set(inputs["timesteps"].ravel().tolist())) > 1  # layers run at different timesteps
    out = _apply(model, params, inputs)
    assert out.shape == (2, num_layers, SIZE, SIZE, 8)
    sd_apply = jax.jit(unet.apply)
    for layer in range(num_layers):
        ref = sd_apply({"params": sd_params}, inputs["latents"][:, layer, ..., :4], inputs["timesteps"][:, layer], inputs["global_context"])
        np.testing.assert_allclose(out[:, layer, ..., :4], ref, atol=1e-4, rtol=0)


def test_init_follows_the_paper(sd, layerdiff):
    _, sd_params = sd
    _, params = layerdiff
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    assert float(flat["mask_gate"]) == 0.0
    np.testing.assert_array_equal(flat["conv_in_mask/kernel"], sd_params["conv_in"]["kernel"])
    np.testing.assert_array_equal(flat["conv_out_mask/kernel"], sd_params["conv_out"]["kernel"])
    attn2 = sd_params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]
    for proj in ("to_q", "to_k", "to_v"):
        np.testing.assert_array_equal(flat[f"unet/down_blocks_1/layer_attentions_0/intra_attn/{proj}/kernel"], attn2[proj]["kernel"])
    last_linears = [k for k in flat if k.endswith(("to_out_0/kernel", "net_2/kernel")) and ("layer_attentions" in k or "prompt_enhancer" in k)]
    assert last_linears and all(not np.any(flat[k]) for k in last_linears)
    inter_q = flat["unet/down_blocks_1/layer_attentions_0/inter_attn/to_q/kernel"]
    assert np.std(inter_q) > 0  # random, not copied or zero


@pytest.fixture(scope="module")
def trained(layerdiff):
    """Every parameter perturbed, so no new block is the identity any more."""
    model, params = layerdiff
    return model, _randomize(params, 7, scale=0.2)


def test_padded_layers_do_not_affect_valid_layers(trained):
    model, params = trained
    valid = [[True, True, True, False], [True, True, False, False]]
    a = _inputs(2, 4, seed=3, valid=valid)
    b = {k: v.copy() for k, v in a.items()}
    pad = ~b["layer_valid"]
    rng = np.random.default_rng(9)
    b["latents"][pad] = rng.normal(size=b["latents"][pad].shape)
    b["layer_context"][pad] = rng.normal(size=b["layer_context"][pad].shape)
    b["timesteps"][pad] = 999
    out_a, out_b = _apply(model, params, a), _apply(model, params, b)
    np.testing.assert_allclose(out_a[a["layer_valid"]], out_b[a["layer_valid"]], atol=1e-5, rtol=0)
    assert not np.allclose(out_a[pad], out_b[pad])  # the padded layers themselves did change


def test_permuting_foregrounds_permutes_outputs(trained):
    model, params = trained
    inputs = _inputs(1, 4, seed=4)
    order = np.array([0, 3, 1, 2])  # background stays first
    permuted = {k: (v[:, order] if v.ndim >= 2 and k != "global_context" else v) for k, v in inputs.items()}
    out, out_perm = _apply(model, params, inputs), _apply(model, params, permuted)
    np.testing.assert_allclose(out_perm, out[:, order], atol=1e-4, rtol=0)
    assert not np.allclose(out[:, 1], out[:, 2], atol=1e-3)  # layers genuinely differ


def test_every_new_parameter_gets_gradient_off_zero_init(layerdiff):
    model, params = layerdiff
    inputs = _inputs(2, 3, seed=5, valid=[[True, True, True], [True, True, False]])
    target = np.random.default_rng(6).normal(size=inputs["latents"].shape).astype(np.float32)

    @jax.jit
    def grad_fn(p):
        return jax.grad(lambda p: jnp.mean((model.apply({"params": p}, **inputs) - target) ** 2))(p)

    # The prompt enhancer sits behind two zero-initialised linears (its own to_out and the intra-layer
    # to_out), so it needs two steps off zero-init before every one of its parameters sees gradient.
    stepped = params
    for _ in range(2):
        stepped = jax.tree.map(lambda p, g: p - 1.0 * g, stepped, grad_fn(stepped))
    grads = flax.traverse_util.flatten_dict(grad_fn(stepped), sep="/")
    new = [k for k in grads if not k.startswith("unet/") or "layer_attentions" in k]
    assert any("prompt_enhancer" in k for k in new) and any("inter_attn" in k for k in new)
    dead = [k for k in new if not np.any(np.asarray(grads[k]))]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize(
    "config, present, absent",
    [
        (LayerDiffConfig(prompt_enhancer="none"), ["intra_attn"], ["prompt_enhancer"]),
        (LayerDiffConfig(prompt_enhancer="s"), ["prompt_enhancer/self_attn"], ["prompt_enhancer/cross_attn"]),
        (LayerDiffConfig(prompt_enhancer="s+c+f"), ["prompt_enhancer/cross_attn", "prompt_enhancer/ff"], []),
        (LayerDiffConfig(use_layer_prompts=False), ["inter_attn"], ["intra_attn", "prompt_enhancer"]),
        (LayerDiffConfig(layer_order_embedding=True), ["layer_order"], []),
    ],
)
def test_variants(sd, config, present, absent):
    unet, sd_params = sd
    config = LayerDiffConfig(**{**config.__dict__, "enhancer_heads": 4})
    model, params = init_from_sd(unet, sd_params, config, jax.random.key(0))
    names = "\n".join(flax.traverse_util.flatten_dict(params, sep="/"))
    assert all(p in names for p in present) and not any(a in names for a in absent)
    inputs = _inputs(1, 2, seed=8)
    if not config.use_layer_prompts:
        inputs["layer_context"] = None
    out = _apply(model, params, inputs)
    assert out.shape == (1, 2, SIZE, SIZE, 8) and np.all(np.isfinite(out))


def test_bfloat16_compute_is_close_to_float32(sd, layerdiff):
    unet, sd_params = sd
    model32, params = layerdiff
    model16 = LayerDiffUNet(model32.unet_config, model32.config, dtype=jnp.bfloat16)
    inputs = _inputs(1, 2, seed=10)
    out32, out16 = _apply(model32, params, inputs), _apply(model16, params, inputs)
    assert out16.dtype == jnp.bfloat16
    rel = np.linalg.norm(out16.astype(np.float32) - out32) / np.linalg.norm(out32)
    assert rel < 5e-2


def test_bad_inputs_name_the_problem(layerdiff):
    model, params = layerdiff
    with pytest.raises(ValueError, match="max_layers=4"):
        _apply(model, params, _inputs(1, 5))
    bad = _inputs(1, 2)
    bad["timesteps"] = bad["timesteps"][:, :1]
    with pytest.raises(ValueError, match="timesteps"):
        _apply(model, params, bad)
    bad = _inputs(1, 2)
    bad["layer_context"] = bad["layer_context"][:, :1]
    with pytest.raises(ValueError, match="layer_context"):
        _apply(model, params, bad)
    with pytest.raises(ValueError, match="prompt_enhancer"):
        LayerDiffConfig(prompt_enhancer="x")


def test_sd15_size_parameter_count():
    model = LayerDiffUNet(UNetConfig.sd15(), LayerDiffConfig())
    params = abstract_params(model, *model.example_inputs())
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    count = lambda keys: sum(int(np.prod(flat[k].shape)) for k in keys)  # noqa: E731
    sd_keys = [k for k in flat if k.startswith("unet/") and "layer_attentions" not in k]
    new_keys = [k for k in flat if k not in set(sd_keys)]
    assert count(sd_keys) == 859_520_964
    print(f"\nLayerDiff at SD-1.5 size: SD {count(sd_keys):,} + new {count(new_keys):,} = {count(flat):,}")
    assert count(new_keys) > 0


def test_model_folder_round_trip(trained, tmp_path):
    from layerdiff_jax.convert.model_folder import load_layerdiff, save_layerdiff

    model, params = trained
    save_layerdiff(tmp_path, model, params)
    loaded, loaded_params = load_layerdiff(tmp_path)
    assert loaded.config == model.config and loaded.unet_config == model.unet_config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_params)):
        np.testing.assert_array_equal(a, b)
