"""Original (LDM) single-file SD-1.x checkpoints: key mapping, loading, and strictness.

The reference: tiny diffusers/transformers torch models with random weights, saved as a diffusers SD
folder. `ldm_state_dict` below writes them in the original LDM layout with an inverse mapping of its own
(diffusers -> LDM), which is checked against diffusers' own `from_single_file`; our loader must then
recover exactly the diffusers weights. Helpers here are shared with test_convert_weights.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig as TorchCLIPTextConfig  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from layerdiff_jax.convert import single_file  # noqa: E402
from layerdiff_jax.convert.clip_text import load_text_encoder  # noqa: E402
from layerdiff_jax.convert.core import ConversionError  # noqa: E402
from layerdiff_jax.convert.sd_folder import load_sd, read_component_configs  # noqa: E402
from layerdiff_jax.convert.unet import load_unet  # noqa: E402
from layerdiff_jax.convert.vae import load_vae  # noqa: E402
from layerdiff_jax.models.unet import UNetConfig  # noqa: E402
from layerdiff_jax.models.vae import VAEConfig  # noqa: E402

TORCH_MODELS = ("unet", "vae", "text_encoder")
TEXT_LENGTH = 16

# --------------------------------------------------------------------------------------------------
# The tiny reference SD folder


def build_tiny_sd(folder: Path, *, unet_layers=2, vae_layers=1, seed=0) -> dict[str, torch.nn.Module]:
    """Tiny SD-1.5-shaped torch models with random weights, saved as a diffusers SD folder at `folder`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=unet_layers,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=vae_layers,
        norm_num_groups=8,
        sample_size=16,
    )
    text = CLIPTextModel(
        TorchCLIPTextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # Every tensor random and distinct, so that a swapped pair of same-shaped weights cannot go unnoticed.
    with torch.no_grad():
        for model in (unet, vae, text):
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    tokenizer_src = folder.parent / f"{folder.name}_tokenizer_src"
    tokenizer_src.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tokenizer_src / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_src / "merges.txt").write_text("#version: 0.2\n")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_src, model_max_length=TEXT_LENGTH),
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}


# --------------------------------------------------------------------------------------------------
# diffusers -> LDM, written independently of the library's LDM -> diffusers tables

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_SINGLE_LAYERS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key_to_ldm(key: str, layers_per_block: int, up_block_types) -> str:
    stride = layers_per_block + 1  # LDM entries per down block (layers + downsampler) and per up block
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        ldm, first = ("input_blocks", 1) if m[1] == "down" else ("output_blocks", 0)
        layer = f"{ldm}.{first + int(m[2]) * stride + int(m[4])}"
        if m[3] == "attentions":
            return f"{layer}.1.{m[5]}"
        module, leaf = m[5].rsplit(".", 1)
        return f"{layer}.0.{_RESNET_TO_LDM[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"input_blocks.{1 + int(m[1]) * stride + layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", key):
        return f"middle_block.{2 * int(m[1])}.{_RESNET_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        slot = 2 if up_block_types[int(m[1])].startswith("CrossAttn") else 1
        return f"output_blocks.{int(m[1]) * stride + layers_per_block}.{slot}.conv.{m[2]}"
    module, leaf = key.rsplit(".", 1)
    return f"{_UNET_SINGLE_LAYERS[module]}.{leaf}"


def vae_key_to_ldm(key: str, n_blocks: int) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        key = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        key = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        key = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        key = f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        key = f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def ldm_state_dict(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The three models' weights as an original SD-1.x checkpoint stores them (torch tensors)."""
    unet_cfg, vae_cfg = models["unet"].config, models["vae"].config
    out = {}
    for key, value in models["unet"].state_dict().items():
        ldm = unet_key_to_ldm(key, unet_cfg.layers_per_block, unet_cfg.up_block_types)
        out["model.diffusion_model." + ldm] = value
    for key, value in models["vae"].state_dict().items():
        if ".mid_block.attentions." in key and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's AttnBlock projections are 1x1 convs
        out["first_stage_model." + vae_key_to_ldm(key, len(vae_cfg.block_out_channels))] = value
    for key, value in models["text_encoder"].state_dict().items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    assert len(out) == sum(len(m.state_dict()) for m in models.values())  # the inverse mapping is injective
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def non_weight_entries() -> dict[str, torch.Tensor]:
    """What real SD-1.x files carry besides the three models' weights (all deliberately ignored)."""
    return {
        "betas": torch.linspace(1e-4, 2e-2, 10),
        "alphas_cumprod": torch.linspace(1.0, 0.1, 10),
        "logvar": torch.zeros(10),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000),
        "model_ema.diffusion_modelinput_blocks00weight": torch.randn(16, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(TEXT_LENGTH)[None],
    }


def write_ldm_file(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """A `.safetensors`, or for `.ckpt` a torch pickle nesting the weights under "state_dict" as LDM does."""
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "global_step": 470000}, str(path))
    return path



def assert_same_params(a, b) -> None:
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(folder, torch models, LDM .safetensors path) for the default tiny SD."""
    root = tmp_path_factory.mktemp("tiny_sd")
    models = build_tiny_sd(root / "sd")
    path = write_ldm_file(root / "tiny-sd.safetensors", {**ldm_state_dict(models), **non_weight_entries()})
    return root / "sd", models, path


@pytest.fixture(scope="module")
def folder_params(tiny_sd):
    folder = tiny_sd[0]
    return {
        "unet": load_unet(folder / "unet")[1],
        "vae": load_vae(folder / "vae")[1],
        "text_encoder": load_text_encoder(folder / "text_encoder")[1],
    }


# --------------------------------------------------------------------------------------------------
# The test's inverse mapping is what diffusers reads, and our split inverts it exactly


@pytest.mark.parametrize("unet_layers,vae_layers", [(2, 1), (1, 2)])
def test_ldm_layout_agrees_with_diffusers_and_split_recovers_it(tmp_path, unet_layers, vae_layers):
    models = build_tiny_sd(tmp_path / "sd", unet_layers=unet_layers, vae_layers=vae_layers, seed=unet_layers)
    ldm = ldm_state_dict(models)
    path = write_ldm_file(tmp_path / "model.safetensors", {**ldm, **non_weight_entries()})

    # diffusers' own single-file loader reads the file back into exactly the original weights.
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tmp_path / "sd"), local_files_only=True, low_cpu_mem_usage=False
    )
    for name in TORCH_MODELS:
        reloaded, original = getattr(pipe, name).state_dict(), models[name].state_dict()
        assert set(reloaded) == set(original), name
        unequal = [k for k in original if not torch.equal(reloaded[k], original[k])]
        assert not unequal, f"{name}: {unequal[:5]}"

    configs = read_component_configs(tmp_path / "sd")
    parts = single_file.split_ldm_checkpoint(
        {k: v.numpy() for k, v in {**ldm, **non_weight_entries()}.items()},
        unet_config=configs["unet"],
        vae_config=configs["vae"],
    )
    for name in TORCH_MODELS:
        original = models[name].state_dict()
        assert set(parts[name]) == set(original), (name, sorted(set(parts[name]) ^ set(original))[:5])
        for key, value in original.items():
            assert parts[name][key].shape == tuple(value.shape), key
            assert np.array_equal(parts[name][key], value.numpy()), key


def test_sd15_tables_cover_the_full_size_models():
    """At SD 1.5's real sizes (shapes only, on torch's meta device) every LDM key maps back to its diffusers key."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNetConfig.sd15().to_diffusers_config())
        vae = AutoencoderKL(**VAEConfig.sd15().to_diffusers_config())
        text = CLIPTextModel(TorchCLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    models = {"unet": unet, "vae": vae, "text_encoder": text}
    # Zero-stride numpy stand-ins: full shapes without allocating them.
    ldm = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in ldm_state_dict(models).items()}
    assert ldm["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["first_stage_model.decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert len(ldm) == 686 + 248 + 196
    parts = single_file.split_ldm_checkpoint(ldm)  # SD 1.5's configs by default
    for name, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in parts[name].items()} == expected


# --------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_gives_the_folder_params(tiny_sd, folder_params, tmp_path, suffix):
    folder, models, safetensors_path = tiny_sd
    path = safetensors_path
    if suffix == ".ckpt":
        path = write_ldm_file(tmp_path / "tiny-sd.ckpt", {**ldm_state_dict(models), **non_weight_entries()})
    configs = read_component_configs(folder)
    loaded = single_file.load_single_file(
        path, unet_config=configs["unet"], vae_config=configs["vae"], text_config=configs["text_encoder"]
    )
    assert set(loaded) == set(TORCH_MODELS)
    for name in TORCH_MODELS:
        assert loaded[name][0].config == configs[name]
        assert_same_params(loaded[name][1], folder_params[name])
    via_load_sd = load_sd(path, config_dir=folder)
    for name in TORCH_MODELS:
        assert_same_params(via_load_sd[name][1], folder_params[name])


def test_single_file_models_match_torch(tiny_sd):
    folder, models, path = tiny_sd
    loaded = load_sd(path, config_dir=folder)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        # UNet: non-square latents, batch 2, two timesteps.
        latents = rng.standard_normal((2, 8, 16, 4)).astype(np.float32)
        timesteps = np.array([3, 781])
        context = rng.standard_normal((2, 5, 32)).astype(np.float32)
        unet, params = loaded["unet"]
        ours = jax.jit(unet.apply)({"params": params}, latents, timesteps, context)
        ref = models["unet"](
            torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(timesteps), torch.from_numpy(context)
        ).sample
        np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)

        vae, params = loaded["vae"]
        images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
        ours = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode_mean))(params, images)
        ref = models["vae"].encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
        np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
        z = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
        ours = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.decode))(params, z)
        ref = models["vae"].decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
        np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)

        text, params = loaded["text_encoder"]
        ids = rng.integers(0, 64, (2, TEXT_LENGTH))
        ours = text.apply({"params": params}, ids)
        ref = models["text_encoder"](torch.from_numpy(ids)).last_hidden_state
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# Strictness


def _load(state_dict: dict[str, torch.Tensor], path: Path, folder: Path):
    write_ldm_file(path, state_dict)
    configs = read_component_configs(folder)
    return single_file.load_single_file(
        path, unet_config=configs["unet"], vae_config=configs["vae"], text_config=configs["text_encoder"]
    )


def test_extra_key_is_named(tiny_sd, tmp_path):
    folder, models, _ = tiny_sd
    state = ldm_state_dict(models)
    state["model.diffusion_model.input_blocks.1.0.in_layers.5.weight"] = torch.zeros(16)  # not a ResBlock layer
    state["first_stage_model.encoder.down.7.block.0.conv1.weight"] = torch.zeros(1)  # a block the config lacks
    state["lora_unet_down.alpha"] = torch.zeros(())  # outside the three models
    with pytest.raises(ConversionError) as err:
        _load(state, tmp_path / "extra.safetensors", folder)
    for key in (
        "model.diffusion_model.input_blocks.1.0.in_layers.5.weight",
        "first_stage_model.encoder.down.7.block.0.conv1.weight",
        "lora_unet_down.alpha",
    ):
        assert key in str(err.value)
    assert "unexpected 3 key(s)" in str(err.value)


def test_missing_weights_are_named(tiny_sd, tmp_path):
    folder, models, _ = tiny_sd
    state = ldm_state_dict(models)
    del state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]  # one weight
    for key in [k for k in state if k.startswith("first_stage_model.decoder.up.0.block.1.")]:  # a whole resnet
        del state[key]
    with pytest.raises(ConversionError, match=r"first_stage_model\.decoder\.up\.0\.block\.1\.\*") as err:
        _load(state, tmp_path / "missing_block.safetensors", folder)
    assert "decoder.up_blocks.1.resnets.1" in str(err.value)

    state = ldm_state_dict(models)
    del state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    with pytest.raises(ConversionError, match="down_blocks_0/resnets_0/conv1/kernel"):
        _load(state, tmp_path / "missing_weight.safetensors", folder)


def test_mis_shaped_weight_is_named(tiny_sd, tmp_path):
    folder, models, _ = tiny_sd
    state = ldm_state_dict(models)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(7)
    with pytest.raises(ConversionError, match=r"shape mismatch.*final_layer_norm\.weight"):
        _load(state, tmp_path / "bad_shape.safetensors", folder)


def test_other_model_family_is_recognised(tiny_sd, tmp_path):
    folder, models, _ = tiny_sd
    state = {k: v for k, v in ldm_state_dict(models).items() if not k.startswith("cond_stage_model.")}
    state["cond_stage_model.model.token_embedding.weight"] = torch.zeros(64, 32)  # SD-2's OpenCLIP
    with pytest.raises(ConversionError, match=r"SD-2\.x") as err:
        _load(state, tmp_path / "sd2.safetensors", folder)
    assert "cond_stage_model.model.token_embedding.weight" in str(err.value)
    assert "cond_stage_model.transformer.* (the CLIP text encoder)" in str(err.value)


def test_text_encoder_with_or_without_text_model_wrapper(tiny_sd):
    """Some older SD-1.x files store the text encoder as cond_stage_model.transformer.{embeddings,encoder,...}."""
    folder, models, _ = tiny_sd
    configs = read_component_configs(folder)
    split = lambda state: single_file.split_ldm_checkpoint(  # noqa: E731
        {k: v.numpy() for k, v in state.items()}, unet_config=configs["unet"], vae_config=configs["vae"]
    )
    state = ldm_state_dict(models)
    unwrapped = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in state.items()}
    assert unwrapped != state
    expected = split(state)["text_encoder"]
    got = split(unwrapped)["text_encoder"]
    assert got.keys() == expected.keys() == models["text_encoder"].state_dict().keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    wrapped_bias = state["cond_stage_model.transformer.text_model.final_layer_norm.bias"]
    both = {**state, "cond_stage_model.transformer.final_layer_norm.bias": wrapped_bias}
    duplicate = r"unexpected 1 key\(s\): cond_stage_model\.transformer\.(text_model\.)?final_layer_norm\.bias"
    with pytest.raises(ConversionError, match=duplicate):
        split(both)


def test_ignore_rule():
    for key in non_weight_entries():
        assert single_file.is_ignored_key(key), key
    for key in ("model.diffusion_model.out.2.weight", "first_stage_model.quant_conv.weight", "alphas"):
        assert not single_file.is_ignored_key(key), key


def test_bad_file_names_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        single_file.load_single_file(tmp_path / "no-such.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        single_file.load_single_file(tmp_path / "notes.txt")
    save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match="is not an original .LDM. SD-1.x checkpoint"):
        single_file.load_single_file(tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ConversionError, match="truncated.safetensors"):
        single_file.load_single_file(tmp_path / "truncated.safetensors")
