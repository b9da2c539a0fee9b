"""Edits follow their new prompt by default; a model folder's recorded sampling settings are the tools' defaults.

The model is LayerDiff initialised from the shipped toy base, as the demo's step 0 (`init_from_sd`: the new modules
are the identity), so every layer draws what the GLOBAL prompt names, the whole composite. Inpainting a layer
with a new prompt redraws the old object while the global prompt names it, and draws the new one once the global
prompt follows the edit; which object a layer drew is read with the evaluator's palette votes and shape classes.
"""

import os
import shutil

import numpy as np
import pytest
from script_support import load_script

from configs import demo
from layerdiff_jax.convert.model_folder import SAMPLING_FILE, SamplingSettings, load_sampling_settings, save_sampling_settings
from layerdiff_jax.data.layers import LayeredSample, read_sample_folder, write_sample_folder
from layerdiff_jax.data.synthetic import PALETTE, SHAPES, foreground_prompt, generate_sample, parse_foreground_prompt
from layerdiff_jax.demo import export_step0, finetune_config
from layerdiff_jax.diffusion.settings import RequestError
from layerdiff_jax.evaluation.prompt_following import background_colour, palette_votes
from layerdiff_jax.evaluation.shapes import classify_shape
from layerdiff_jax.sampling.editing import edited_global_prompt, inpaint_layer
from layerdiff_jax.sampling.sampler import CheckpointError, LayerDiffPipeline
from layerdiff_jax.toy import TOY_BASE

COLOURS = list(PALETTE)
EDITS = 12  # 2-layer synthetic samples, each with its foreground inpainted as a new colour and shape
SIZE = 64  # the toy base's resolution

sample_script, edit_script = load_script("sample"), load_script("edit")


@pytest.fixture(scope="module")
def config():
    return demo.get_config()


@pytest.fixture(scope="module")
def model(config, tmp_path_factory):
    """The demo's step-0 model folder, recording the demo's sampling settings (25 DDIM steps, guidance 1)."""
    return export_step0(TOY_BASE, finetune_config(config), tmp_path_factory.mktemp("step0") / "model")


@pytest.fixture(scope="module")
def pipe(model):
    return LayerDiffPipeline.load(model)


def layered(global_prompt: str, *layer_prompts: str) -> LayeredSample:
    k = len(layer_prompts) - 1
    return LayeredSample(
        np.zeros((8, 8, 3), np.uint8), np.zeros((k, 8, 8, 3), np.uint8), np.zeros((k, 8, 8), np.uint8), global_prompt, list(layer_prompts)
    )


@pytest.mark.parametrize("sample, target, prompt, expected", [
    (layered("a red circle and a green square on a blue background", "a blue background", "a red circle", "a green square"),
     1, "a white triangle", ("a white triangle and a green square on a blue background", "replaced")),
    (layered("a red circle on a blue background", "a blue background", "a red circle"),
     0, "a yellow striped background", ("a red circle on a yellow striped background", "replaced")),
    # A whole-phrase match, in any case, with the layer prompt taken literally.
    (layered("A cat (asleep) on a catwalk", "a catwalk", "a cat (asleep)"), 1, "a dog", ("a dog on a catwalk", "replaced")),
    # Not named (or only inside another word): rebuilt from the layer prompts.
    (layered("a catalog on a table", "a table", "a cat"), 1, "a dog", ("a dog on a table", "rebuilt")),
    (layered("a still life", "the background", "an apple", "a pear"), 2, "a plum", ("an apple and a plum on the background", "rebuilt")),
    # Named twice (two layers with one prompt): which is this layer's is unknown, so rebuilt.
    (layered("a red circle and a red circle on a blue background", "a blue background", "a red circle", "a red circle"),
     2, "a green square", ("a red circle and a green square on a blue background", "rebuilt")),
    (layered("a sunny sky", "a blue sky"), 0, "a grey sky", ("a grey sky", "rebuilt")),
])
def test_global_prompt_follows_the_edited_layer_prompt(sample, target, prompt, expected):
    assert edited_global_prompt(sample, target, prompt) == expected


def drawn_object(sample: LayeredSample) -> tuple[str, str | None]:
    """(colour, shape) of the object foreground layer 1 draws: the palette colour most of its pixels vote for, the
    background's aside, and the shape of those pixels. (At initialisation a layer draws the whole composite and
    its mask is not yet the object's, so the evaluator's mask-based layer score does not apply.)"""
    votes = palette_votes(sample.foregrounds[0])
    counts = np.bincount(votes.ravel(), minlength=len(COLOURS))
    counts[COLOURS.index(background_colour(sample.background))] = 0
    colour = int(np.argmax(counts))
    return COLOURS[colour], classify_shape((votes == colour).astype(np.float32))


def new_object(sample: LayeredSample, rng: np.random.Generator) -> str:
    """A foreground prompt of another colour (not the background's) and another shape than layer 1's."""
    old = sample.metadata["foregrounds"][0]
    colours = [c for c in COLOURS if c not in (old["colour"], sample.metadata["background"]["colour"])]
    return foreground_prompt(rng.choice(colours), rng.choice([s for s in SHAPES if s != old["shape"]]))


def test_inpainting_draws_the_new_layer_prompt(pipe):
    steps, guidance, _ = pipe.sampling.choose()  # the demo's: 25 DDIM steps, guidance 1
    rng = np.random.default_rng(0)
    hits = {"followed": [], "old global prompt": []}  # (colour, shape) right
    for i in range(EDITS):
        sample = generate_sample(seed=7, index=i, resolution=SIZE, layer_mix={2: 1.0})
        prompt = new_object(sample, rng)
        wanted = parse_foreground_prompt(prompt)
        followed = inpaint_layer(pipe, sample, 1, prompt, seed=i, steps=steps, guidance=guidance)
        assert followed.global_prompt == sample.global_prompt.replace(sample.layer_prompts[1], prompt)
        kept = inpaint_layer(pipe, sample, 1, prompt, global_prompt=sample.global_prompt, seed=i, steps=steps, guidance=guidance)
        assert kept.metadata["edits"][0]["global_prompt_from"] == "given"  # the old behaviour, for contrast
        for name, edited in (("followed", followed), ("old global prompt", kept)):
            hits[name].append([got == want for got, want in zip(drawn_object(edited), wanted)])
    colour, shape = np.mean(hits["followed"], axis=0)
    old_colour, old_shape = np.mean(hits["old global prompt"], axis=0)
    print(f"new colour / shape drawn in {EDITS} edits: {colour:.2f} / {shape:.2f}; with the old global prompt {old_colour:.2f} / {old_shape:.2f}")
    assert colour >= 0.75 and shape >= 0.5
    assert old_colour <= 0.25 and old_shape <= 0.25  # the measure tells the two apart


def test_model_folder_records_its_sampling_settings(config, model, pipe, tmp_path):
    where = f"recorded in {model / SAMPLING_FILE}"
    assert (config.sample.steps, config.sample.guidance) == (25, 1.0)  # what the demo samples with
    assert load_sampling_settings(model) == pipe.sampling == SamplingSettings(25, 1.0, where)
    assert pipe.sampling.choose() == (25, 1.0, f"sampling settings: 25 DDIM steps ({where}), guidance 1 ({where})")
    assert pipe.sampling.choose(steps=10) == (10, 1.0, f"sampling settings: 10 DDIM steps (given), guidance 1 ({where})")
    paper = load_sampling_settings(tmp_path)  # none recorded: the paper's
    assert paper.choose() == (100, 3.0, "sampling settings: 100 DDIM steps (the paper's default), guidance 3 (the paper's default)")
    with pytest.raises(RequestError, match="guidance must be"):
        save_sampling_settings(tmp_path, SamplingSettings(25, -1.0))


@pytest.mark.parametrize("text", [
    "{", "[25, 1.0]", '{"steps": 25}', '{"steps": 25, "guidance": 1.0, "eta": 0}', '{"steps": 25.0, "guidance": 1.0}',
    '{"steps": 25, "guidance": -1}', '{"steps": 5000, "guidance": 1.0}',  # the schedule has 1000 timesteps
])
def test_a_broken_sampling_file_is_refused_naming_it(model, tmp_path, text):
    (tmp_path / SAMPLING_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"^{tmp_path / SAMPLING_FILE}: "):
        load_sampling_settings(tmp_path, num_train_timesteps=1000)


def test_the_pipeline_refuses_a_model_folder_with_a_broken_sampling_file(model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(model, broken, copy_function=os.link)
    (broken / SAMPLING_FILE).unlink()  # a hard link: write a new file, not through the link
    (broken / SAMPLING_FILE).write_text('{"steps": 0, "guidance": 1.0}')
    with pytest.raises(CheckpointError, match=f"checkpoint {broken}: .*{broken / SAMPLING_FILE}: steps must be"):
        LayerDiffPipeline.load(broken)


def test_the_tools_default_to_the_recorded_settings(model, tmp_path, capsys):
    where = f"recorded in {model / SAMPLING_FILE}"
    base = ["--checkpoint", str(model), "--size", str(SIZE), str(SIZE), "--quiet", "--formats"]
    args = sample_script.parse_args([*base, "--prompt", "a red circle on a blue background", "--layer-prompt", "a red circle", "--out", str(tmp_path / "s")])
    assert (args.steps, args.guidance) == (None, None)
    assert sample_script.main([*base, "--prompt", "a red circle on a blue background", "--layer-prompt", "a red circle",
                               "--out", str(tmp_path / "samples")]) == 0
    assert f"sampling settings: 25 DDIM steps ({where}), guidance 1 ({where})" in capsys.readouterr().out
    generated = read_sample_folder(tmp_path / "samples" / "sample_0000")
    assert (generated.metadata["steps"], generated.metadata["guidance"]) == (25, 1.0)

    source = write_sample_folder(generate_sample(seed=7, index=0, resolution=SIZE, layer_mix={2: 1.0}), tmp_path / "source")
    edit = ["inpaint", "--checkpoint", str(model), "--sample", str(source), "--layer", "1", "--prompt", "a white square", "--formats"]
    args = edit_script.parse_args([*edit, "--out", str(tmp_path / "e")])
    assert (args.steps, args.guidance) == (None, None)
    assert edit_script.main([*edit, "--steps", "25", "--out", str(tmp_path / "edited")]) == 0
    assert f"sampling settings: 25 DDIM steps (given), guidance 1 ({where})" in capsys.readouterr().out
    (record,) = read_sample_folder(tmp_path / "edited").metadata["edits"]
    assert (record["steps"], record["guidance"], record["global_prompt_from"]) == (25, 1.0, "replaced")
