"""The shipped toy base: an SD folder that loads as converted SD-1.5 does, with no LayerDiff parameters, and
the parameter counts, size and provenance it records."""

import json

import flax
import jax
import numpy as np

from layerdiff_jax.convert.core import COMPONENTS, count_params
from layerdiff_jax.convert.model_folder import load_scheduler_config
from layerdiff_jax.convert.sd_folder import load_sd
from layerdiff_jax.data.tokenizer import load_tokenizer
from layerdiff_jax.models.layerdiff import LayerDiffConfig, init_from_sd
from layerdiff_jax.toy import TOY_BASE, toy_configs

MAX_BYTES = 20 * 2**20
NEW_MODULES = ("layer_attentions", "conv_in_mask", "conv_out_mask", "mask_gate", "prompt_enhancer", "layer_order")


def test_shipped_base_loads_as_an_sd_folder_without_layerdiff_parameters():
    assert sum(f.stat().st_size for f in TOY_BASE.rglob("*") if f.is_file()) <= MAX_BYTES
    components = load_sd(TOY_BASE)
    provenance = json.loads((TOY_BASE / "provenance.json").read_text())
    latest = provenance["runs"][-1]
    tokenizer = load_tokenizer(TOY_BASE)
    configs = toy_configs(tokenizer.vocab_size)
    for name in COMPONENTS:
        module, params = components[name]
        assert count_params(params) == latest["parameters"][name], name
        keys = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
        assert not [k for k in keys if any(new in k for new in NEW_MODULES)], name
        assert all(np.isfinite(v).all() for v in keys.values()), name
    # The toy architecture the code describes, so a regenerated base is a drop-in replacement.
    assert components["unet"][0].config == configs["unet"]
    assert components["text_encoder"][0].config == configs["text_encoder"]
    assert load_scheduler_config(TOY_BASE).prediction_type == "v_prediction"

    # What a regeneration needs, and what it scored.
    for field in ("command", "commit", "seed", "steps", "samples_seen", "wall_time_s", "machine", "scores"):
        assert latest[field] not in (None, ""), field
    assert latest["samples_seen"] == latest["steps"] * latest["batch_size"]
    assert "configs/toy_sd_pretrain.py" in latest["command"]

    # LayerDiff starts from it exactly as from converted SD-1.5.
    unet, unet_params = components["unet"]
    init_from_sd(unet, unet_params, LayerDiffConfig(enhancer_heads=4), jax.random.key(0))
