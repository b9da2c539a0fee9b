"""The toy base's pretraining: flat views of layered data, and configs/toy_sd_pretrain.py through the real trainer."""

import flax
import jax
import numpy as np
import pytest
from train_support import RESOLUTION, load_config, make_micro_data, make_micro_sd

from layerdiff_jax.convert.model_folder import load_scheduler_config
from layerdiff_jax.convert.sd_folder import load_sd
from layerdiff_jax.data.layers import DataError
from layerdiff_jax.data.loader import ToFlatImage, parse_flat_views, single_object_view
from layerdiff_jax.data.synthetic import PALETTE, generate_sample, parse_background_prompt, parse_foreground_prompt
from layerdiff_jax.data.tfds_builders import sample_to_example
from layerdiff_jax.data.tokenizer import build_toy_tokenizer
from layerdiff_jax.models.layerdiff import LayerDiffConfig, init_from_sd
from layerdiff_jax.training.config import ConfigError, validate_config
from layerdiff_jax.training.metric_writer import read_metrics
from layerdiff_jax.training.trainer import train


def _record(sample):
    """A record as the data source decodes it (images as arrays)."""
    example = sample_to_example(sample)
    import io

    import PIL.Image

    decode = lambda png: np.asarray(PIL.Image.open(io.BytesIO(png)))  # noqa: E731
    record = dict(example)
    record["background"] = decode(example["background"])
    record["foregrounds"] = [decode(x) for x in example["foregrounds"]]
    record["masks"] = [decode(x)[..., None] if decode(x).ndim == 2 else decode(x) for x in example["masks"]]
    return record


def test_single_object_view_is_the_object_alone_on_a_plain_background():
    sample = generate_sample(5, 0, layer_mix={3: 1.0})
    colour, shape = parse_foreground_prompt(sample.layer_prompts[2])
    other = next(c for c in PALETTE if c != colour)
    image, prompt = single_object_view(sample, 2, other)
    inside = sample.masks[1] > 0
    assert prompt == f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} on {'an' if other[0] in 'aeiou' else 'a'} {other} background"
    assert (image[inside] == PALETTE[colour]).all() and (image[~inside] == PALETTE[other]).all()

    sample.layer_prompts[1] = "a teapot"
    with pytest.raises(DataError, match="synthetic vocabulary"):
        single_object_view(sample, 1, other)


def test_flat_views_follow_their_weights_and_never_show_a_mask():
    tokenizer = build_toy_tokenizer()
    transform = ToFlatImage(tokenizer, parse_flat_views("composite:1,background:1,object:2"))
    kinds = []
    rng = np.random.default_rng(0)
    for i in range(120):
        sample = generate_sample(6, i)
        out = transform.random_map(_record(sample), rng)
        assert out["images"].shape == (64, 64, 3) and out["images"].dtype == np.float32
        assert -1.0 <= out["images"].min() and out["images"].max() <= 1.0
        words = tokenizer.hf_tokenizer.decode(out["ids"], skip_special_tokens=True).replace(" ,", ",")
        if parse_background_prompt(words):
            kinds.append("background")
            np.testing.assert_allclose(out["images"], sample.background / 127.5 - 1.0, atol=1e-6)
        elif words == sample.global_prompt:
            kinds.append("composite")
        else:
            kinds.append("object")
            objects, background = words.split(" on ")
            assert parse_foreground_prompt(objects) and parse_background_prompt(background)[1] == "plain"
    counts = {k: kinds.count(k) for k in ("composite", "background", "object")}
    assert 15 <= counts["composite"] <= 45 and 15 <= counts["background"] <= 45 and 40 <= counts["object"] <= 80, counts


def test_flat_views_config_is_checked():
    config = load_config("toy_sd_pretrain")
    config.data.flat_views = "composite:1,masks:1"
    with pytest.raises(ConfigError, match="data.flat_views"):
        validate_config(config)
    config = load_config("toy_sd_pretrain")
    config.log.sample_every_steps = 10
    with pytest.raises(ConfigError, match="sample_every_steps"):
        validate_config(config)


@pytest.mark.slow
def test_pretraining_config_trains_the_unet_and_text_encoder_and_exports_an_sd_folder(tmp_path):
    sd = make_micro_sd(tmp_path / "sd")
    config = load_config("toy_sd_pretrain")
    config.model.sd_path = str(sd)
    config.data.path = str(make_micro_data(tmp_path / "data", num_train=16))
    config.data.resolution = RESOLUTION
    config.train.num_steps = 3
    config.train.per_host_batch_size = 4
    config.train.warmup_steps = 0
    config.checkpoint.every_steps = 2
    config.log.every_steps = 1
    result = train(config, tmp_path / "run")
    assert result.step == 3
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2, 3]

    before, after = load_sd(sd), load_sd(result.model_dir)
    flat = lambda tree: flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")  # noqa: E731
    for name in ("unet", "text_encoder"):  # both trained (EMA of the trained weights)
        changed = [k for k, v in flat(after[name][1]).items() if not np.array_equal(v, flat(before[name][1])[k])]
        assert changed, name
    for key, value in flat(after["vae"][1]).items():  # the VAE stays frozen
        np.testing.assert_array_equal(value, flat(before["vae"][1])[key], err_msg=key)
    assert not [k for k in flat(after["unet"][1]) if "layer_attentions" in k or "mask" in k]
    assert load_scheduler_config(result.model_dir).prediction_type == "v_prediction"
    assert (result.model_dir / "tokenizer").is_dir()

    # LayerDiff starts from it exactly as from converted SD-1.5.
    unet, unet_params = after["unet"]
    init_from_sd(unet, unet_params, LayerDiffConfig(enhancer_heads=2), jax.random.key(0))
