"""The shipped toy base: an SD folder that loads as converted SD-1.5 does, with no LayerDiff parameters, and
the parameter counts, size and provenance it records; a VAE that keeps what it decodes; its decoder fine-tune."""

import json
import shutil

import flax
import jax
import numpy as np
from script_support import load_script

from configs.toy_sd_pretrain import get_config
from layerdiff_jax.convert.core import COMPONENTS, count_params
from layerdiff_jax.convert.model_folder import load_scheduler_config
from layerdiff_jax.convert.sd_folder import load_sd
from layerdiff_jax.data.tokenizer import load_tokenizer
from layerdiff_jax.evaluation.autoencoder import round_trip_scores
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


def test_shipped_base_vae_keeps_the_layers_and_single_objects_it_decodes():
    """Held-out ground truth encoded and decoded by the shipped VAE still scores nearly as the truth does (its
    decoder, trained on noised latents, trades a little exactness for decoding generated latents cleanly), and
    layers and masks fully."""
    vae, params = load_sd(TOY_BASE)["vae"]
    scores = round_trip_scores(vae, params, count=48)
    assert scores["single object"]["colour"] >= 0.9 and scores["single object"]["shape"] >= 0.85, scores
    layers = scores["layers"]
    assert min(layers["layer_colour_accuracy"], layers["shape_accuracy"], layers["clean_mask_rate"]) >= 0.95, layers


def test_finetune_vae_decoder_trains_the_decoder_in_place_and_records_it(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(TOY_BASE, run / "model")
    (run / "config.json").write_text(get_config().to_json())
    script = load_script("finetune_vae_decoder")
    before = load_sd(run / "model")["vae"][1]
    assert script.main([str(run), "--steps", "3", "--batch-size", "4", "--num-samples", "3", "--count", "2"]) == 0
    after = load_sd(run / "model")["vae"][1]
    for part in before:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])))
        assert same == (part not in ("decoder", "post_quant_conv")), part
    record = json.loads((run / "vae_decoder.json").read_text())
    assert record["steps"] == 3 and set(record["round_trip_scores"]) == {"before", "after", "requests_per_set"}
    assert script.main([str(run)]) == 2  # fine-tuned already
