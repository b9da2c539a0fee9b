"""Original (LDM/CompVis) single-file Stable Diffusion 1.x checkpoints -> our UNet, VAE and text encoder.

An SD-1.x `.ckpt` / `.safetensors` holds three models under three prefixes:

  model.diffusion_model.           UNet, numbered input_blocks.N.M / middle_block.M / output_blocks.N.M
  first_stage_model.               VAE, numbered encoder.down.N.block.M / decoder.up.N.block.M / mid.block_1
  cond_stage_model.transformer.    CLIP text encoder, already under transformers' names: text_model.*
                                   (or without `text_model.`, as some older SD-1.x files store it)

`split_ldm_checkpoint` renames each to the keys of the diffusers/transformers torch model, through one
table per model from LDM module prefixes to diffusers module prefixes. The tables are built from the
model's config, because the LDM numbering depends on the number of blocks, the layers per block and
which blocks carry attention. The resulting state dicts then go through the same strict per-component
converters as a diffusers folder's weights.

Keys deliberately left unused (`is_ignored_key`): the EMA copy of the UNet (`model_ema.*`, stored under
flattened names, plus its decay and update counter: the `model.diffusion_model.*` weights are the ones
converted, as diffusers does by default); LatentDiffusion's noise-schedule buffers and learned-logvar
vector (`_SCHEDULE_BUFFERS`, recomputed by `layerdiff_jax.diffusion`); the text encoder's `position_ids`
buffer (an arange); and the autoencoder's training losses (`first_stage_model.loss.*`: LPIPS and
discriminator). Every other key must be used by exactly one table entry, and every table entry must
receive weights; anything else is a `ConversionError` naming the keys.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.convert import core
from layerdiff_jax.convert.clip_text import (
    abstract_text_encoder_params,
    rename_text_encoder_key,
)
from layerdiff_jax.convert.unet import abstract_unet_params
from layerdiff_jax.convert.unet import rename as rename_unet_key
from layerdiff_jax.convert.vae import abstract_vae_params, rename_vae_key
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
_TEXT_MODEL = "text_model."  # transformers 4's wrapper module; present in most SD-1.x files, not in all

_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_IGNORED_KEYS = frozenset(TEXT_PREFIX + wrapper + "embeddings.position_ids" for wrapper in ("", _TEXT_MODEL))
_SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
# Prefixes of other model families' text encoders, to say what a rejected file probably is.
_OTHER_FAMILIES = {"cond_stage_model.model.": "SD-2.x (OpenCLIP)", "conditioner.": "SDXL / SD-3"}

# LDM ResBlock sublayers -> diffusers ResnetBlock2D sublayers.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# LDM AttnBlock (1x1 convs) -> diffusers Attention (Linears).
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class _Entry(NamedTuple):
    """Where one LDM module goes: its diffusers prefix, and a sublayer rename (None: same sublayer names)."""

    target: str
    sublayers: Mapping[str, str] | None = None
    squeeze_1x1: bool = False  # 1x1-conv weights (O, I, 1, 1) stored as diffusers Linear weights (O, I)


def is_ignored_key(key: str) -> bool:
    """True for the LDM keys that are deliberately not converted (see the module docstring)."""
    return key in _IGNORED_KEYS or key in _SCHEDULE_BUFFERS or key.startswith(_IGNORED_PREFIXES)


def unet_key_table(config: UNetConfig) -> dict[str, _Entry]:
    """LDM UNet module prefixes (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel prefixes.

    LDM numbers each path as one flat list. input_blocks: conv_in, then per down block its (resnet
    [, transformer]) layers and, except after the last block, a downsampler of its own. output_blocks:
    per up block its layers, the block's upsampler riding in its last layer after the transformer if any.
    """
    table = {
        "time_embed.0": _Entry("time_embedding.linear_1"),
        "time_embed.2": _Entry("time_embedding.linear_2"),
        "input_blocks.0.0": _Entry("conv_in"),
        "middle_block.0": _Entry("mid_block.resnets.0", _UNET_RESNET),
        "middle_block.1": _Entry("mid_block.attentions.0"),
        "middle_block.2": _Entry("mid_block.resnets.1", _UNET_RESNET),
        "out.0": _Entry("conv_norm_out"),
        "out.2": _Entry("conv_out"),
    }
    layouts = config.block_layouts()

    def add_layers(kind: str, ldm: str, first: int) -> None:
        """The `kind` ("down" or "up") blocks' layers, as LDM numbers them in its list `ldm` from `first`: a
        downsampler is a layer of its own, an upsampler sits beside its block's last layer."""
        i = first
        for b, block in enumerate(layout for layout in layouts if layout.kind == kind):
            for j in range(block.num_layers):
                table[f"{ldm}.{i}.0"] = _Entry(f"{kind}_blocks.{b}.resnets.{j}", _UNET_RESNET)
                if block.num_heads:
                    table[f"{ldm}.{i}.1"] = _Entry(f"{kind}_blocks.{b}.attentions.{j}")
                i += 1
            if block.resample and kind == "down":
                table[f"{ldm}.{i}.0.op"] = _Entry(f"down_blocks.{b}.downsamplers.0.conv")
                i += 1
            elif block.resample:
                slot = 2 if block.num_heads else 1
                table[f"{ldm}.{i - 1}.{slot}.conv"] = _Entry(f"up_blocks.{b}.upsamplers.0.conv")

    add_layers("down", "input_blocks", 1)
    add_layers("up", "output_blocks", 0)
    return table


def vae_key_table(config: VAEConfig) -> dict[str, _Entry]:
    """LDM autoencoder module prefixes (without `first_stage_model.`) -> diffusers AutoencoderKL prefixes.

    The LDM decoder numbers its up blocks from the lowest resolution's last: decoder.up.N is diffusers'
    up_blocks[n_blocks - 1 - N]. Mid-block attention projections are 1x1 convs in LDM, Linears in diffusers.
    """
    n_blocks = len(config.block_out_channels)
    table = {
        "quant_conv": _Entry("quant_conv"),
        "post_quant_conv": _Entry("post_quant_conv"),
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = _Entry(f"{part}.conv_in")
        table[f"{part}.mid.block_1"] = _Entry(f"{part}.mid_block.resnets.0", _VAE_RESNET)
        table[f"{part}.mid.attn_1"] = _Entry(f"{part}.mid_block.attentions.0", _VAE_ATTENTION, squeeze_1x1=True)
        table[f"{part}.mid.block_2"] = _Entry(f"{part}.mid_block.resnets.1", _VAE_RESNET)
        table[f"{part}.norm_out"] = _Entry(f"{part}.conv_norm_out")
        table[f"{part}.conv_out"] = _Entry(f"{part}.conv_out")
    for b in range(n_blocks):
        for j in range(config.layers_per_block):
            table[f"encoder.down.{b}.block.{j}"] = _Entry(f"encoder.down_blocks.{b}.resnets.{j}", _VAE_RESNET)
        up = n_blocks - 1 - b
        for j in range(config.layers_per_block + 1):
            table[f"decoder.up.{up}.block.{j}"] = _Entry(f"decoder.up_blocks.{b}.resnets.{j}", _VAE_RESNET)
        if b < n_blocks - 1:
            table[f"encoder.down.{b}.downsample.conv"] = _Entry(f"encoder.down_blocks.{b}.downsamplers.0.conv")
            table[f"decoder.up.{up}.upsample.conv"] = _Entry(f"decoder.up_blocks.{b}.upsamplers.0.conv")
    return table


def _rename_by_table(key: str, table: Mapping[str, _Entry]) -> tuple[str, str, _Entry] | None:
    """(matched LDM prefix, diffusers key, entry) for the longest table prefix of `key`; None if none applies."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        entry = table.get(prefix)
        if entry is None:
            continue
        rest = ".".join(parts[n:])
        if entry.sublayers is not None:
            sublayer, _, leaf = rest.rpartition(".")
            if sublayer not in entry.sublayers:
                return None
            rest = f"{entry.sublayers[sublayer]}.{leaf}"
        return prefix, f"{entry.target}.{rest}", entry
    return None


def _split_by_table(
    state_dict: Mapping[str, np.ndarray],
    prefix: str,
    table: Mapping[str, _Entry],
    leftovers: list[str],
    missing: list[str],
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for key, value in state_dict.items():
        if not key.startswith(prefix) or is_ignored_key(key):
            continue
        renamed = _rename_by_table(key[len(prefix) :], table)
        if renamed is None:
            leftovers.append(key)
            continue
        matched, new_key, entry = renamed
        if entry.squeeze_1x1 and np.ndim(value) == 4 and np.shape(value)[2:] == (1, 1):
            value = np.asarray(value)[:, :, 0, 0]
        out[new_key] = value
        used.add(matched)
    missing.extend(f"{prefix}{ldm}.* (diffusers {entry.target})" for ldm, entry in table.items() if ldm not in used)
    return out


def _split_text_encoder(
    state_dict: Mapping[str, np.ndarray], leftovers: list[str], missing: list[str]
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.startswith(TEXT_PREFIX) and not is_ignored_key(key):
            new_key = key[len(TEXT_PREFIX) :].removeprefix(_TEXT_MODEL)
            if new_key in out:  # the same weight stored with and without `text_model.`
                leftovers.append(key)
            else:
                out[new_key] = value
    if not out:
        missing.append(f"{TEXT_PREFIX}* (the CLIP text encoder)")
    return out


def split_ldm_checkpoint(
    state_dict: Mapping[str, np.ndarray],
    *,
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    source: str = "checkpoint",
) -> dict[str, dict[str, np.ndarray]]:
    """An LDM-format SD-1.x state dict -> {"unet", "vae", "text_encoder"}: diffusers/transformers-keyed dicts.

    Text encoder keys come out as transformers 5's `CLIPTextModel` keys (`embeddings.*`, `encoder.*`,
    `final_layer_norm.*`). Raises `ConversionError` naming every key no rule accepts and every LDM module
    the configs expect but the checkpoint lacks. Configs default to SD 1.5's.
    """
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    if not any(key.startswith(prefixes) for key in state_dict):
        raise core.ConversionError(
            f"{source} is not an original (LDM) SD-1.x checkpoint: none of its {len(state_dict)} keys starts with "
            f"{', '.join(prefixes)} (a diffusers-format model is a folder: pass the folder)"
        )
    unet_config = unet_config or UNetConfig.sd15()
    vae_config = vae_config or VAEConfig.sd15()
    leftovers: list[str] = []
    missing: list[str] = []
    parts = {
        "unet": _split_by_table(state_dict, UNET_PREFIX, unet_key_table(unet_config), leftovers, missing),
        "vae": _split_by_table(state_dict, VAE_PREFIX, vae_key_table(vae_config), leftovers, missing),
        "text_encoder": _split_text_encoder(state_dict, leftovers, missing),
    }
    leftovers += [key for key in state_dict if not key.startswith(prefixes) and not is_ignored_key(key)]
    ignored = [key for key in state_dict if is_ignored_key(key)]
    if ignored:
        ema = sum(key.startswith("model_ema.") for key in ignored)
        logger.info("left out %d non-weight keys (%d of them model_ema.*, the UNet's EMA copy)", len(ignored), ema)
    if leftovers or missing:
        families = {name for p, name in _OTHER_FAMILIES.items() if any(k.startswith(p) for k in leftovers)}
        hint = ""
        if families:
            hint = f" (it looks like a {' / '.join(sorted(families))} checkpoint; only SD-1.x is supported)"
        elif missing:
            hint = " (does it have the architecture the configs describe? They default to SD 1.5's)"
        core.raise_on_mismatch(f"{source}{hint}", missing=missing, unexpected=leftovers)
    return parts


class _Converter(NamedTuple):
    """How one component is built from its config and filled from a diffusers-keyed state dict."""

    model: Callable[..., nn.Module]
    abstract_params: Callable[[nn.Module], dict]
    rename: Callable[[str], str | None]


_CONVERTERS = {
    "unet": _Converter(UNet2DConditionModel, abstract_unet_params, rename_unet_key),
    "vae": _Converter(AutoencoderKL, abstract_vae_params, rename_vae_key),
    "text_encoder": _Converter(CLIPTextTransformer, abstract_text_encoder_params, rename_text_encoder_key),
}


def convert_component(
    name: str,
    state_dict: Mapping[str, np.ndarray],
    config: Any,
    *,
    dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    source: str = "checkpoint",
) -> tuple[nn.Module, dict]:
    """(module, float32 params) for component `name` from its diffusers/transformers-keyed torch weights."""
    converter = _CONVERTERS[name]
    model = converter.model(config, dtype=dtype, attention_impl=attention_impl)
    params = core.convert_state_dict(state_dict, converter.abstract_params(model), converter.rename, source=source)
    return model, params


def read_single_file(path: str | Path) -> dict[str, np.ndarray]:
    """The flat state dict of an LDM checkpoint file (`.safetensors` without torch; pickles weights-only)."""
    path = Path(path)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{path}: a single-file checkpoint's name ends in one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    return core.load_torch_file(path)


def load_single_file(
    path: str | Path,
    *,
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: CLIPTextConfig | None = None,
    dtype: Any = jnp.float32,
    attention_impl: str = "auto",
) -> dict[str, tuple[nn.Module, dict]]:
    """{"unet", "vae", "text_encoder"} -> (module, params) from an original single-file SD-1.x checkpoint.

    Configs default to SD 1.5's (`UNetConfig.sd15()` etc.); pass others for a checkpoint of another shape.
    """
    configs = {
        "unet": unet_config or UNetConfig.sd15(),
        "vae": vae_config or VAEConfig.sd15(),
        "text_encoder": text_config or CLIPTextConfig.sd15(),
    }
    start = time.perf_counter()
    parts = split_ldm_checkpoint(
        read_single_file(path), unet_config=configs["unet"], vae_config=configs["vae"], source=str(path)
    )
    logger.info("read %s (%.1f s)", path, time.perf_counter() - start)
    loaded = {}
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
    for name in core.COMPONENTS:
        start = time.perf_counter()
        source = f"{path} [{name}: keys under {prefixes[name]!r}, shown under diffusers names]"
        loaded[name] = convert_component(
            name, parts.pop(name), configs[name], dtype=dtype, attention_impl=attention_impl, source=source
        )
        core.log_loaded(name, loaded[name][1], start)
    return loaded

