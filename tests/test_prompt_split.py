"""A global prompt alone split into layers: exactly the synthetic dataset's layer prompts for every form its
prompts take, the right split for hand-written prompts, an honest refusal otherwise, and sample.py's --prompt
alone."""

import itertools

import pytest
from script_support import load_script

from layerdiff_jax.data.synthetic import (
    PALETTE,
    PATTERNS,
    SHAPES,
    background_prompt,
    foreground_prompt,
    generate_sample,
    global_prompt,
)
from layerdiff_jax.diffusion.settings import BACKGROUND_PROMPT
from layerdiff_jax.data.prompt_split import PromptSplitError, split_prompt

FOREGROUNDS = [foreground_prompt(c, s) for c in PALETTE for s in SHAPES]
BACKGROUNDS = [background_prompt(c, p) for c in PALETTE for p in PATTERNS]
UNSPLITTABLE = "could not split this prompt: give the layers yourself"


def _synthetic_layers():
    """[background, *foregrounds] over the whole vocabulary: every background with every object and every ordered
    pair of objects, and every ordered triple with the backgrounds in turn."""
    yield from ([bg, fg] for bg in BACKGROUNDS for fg in FOREGROUNDS)
    yield from ([bg, a, b] for bg in BACKGROUNDS for a, b in itertools.permutations(FOREGROUNDS, 2))
    for i, objects in enumerate(itertools.permutations(FOREGROUNDS, 3)):
        yield [BACKGROUNDS[i % len(BACKGROUNDS)], *objects]


def _layers(text, max_layers=None):
    split = split_prompt(text, max_layers)
    assert split.global_prompt == text
    return [split.background_prompt, *split.layer_prompts]


def test_every_synthetic_prompt_form_splits_back_into_its_layer_prompts():
    count = 0
    for layers in _synthetic_layers():
        assert _layers(global_prompt(layers[1:], layers[0])) == layers
        count += 1
    assert count > 25_000


def test_generated_samples_split_back_into_their_layer_prompts():
    samples = [generate_sample(3, i, 64, layer_mix={2: 1, 3: 1, 4: 1}) for i in range(300)]
    assert {len(s.layer_prompts) - 1 for s in samples} == {1, 2, 3}
    for s in samples:
        assert _layers(s.global_prompt) == s.layer_prompts, s.global_prompt


# (prompt, background, layers deepest first)
REAL_WORLD = [
    ("a cat and a lamp in front of a window", "a window", ["a cat", "a lamp"]),
    ("a red apple on a wooden table", "a wooden table", ["a red apple"]),
    # A verb stays with its subject and a plural is one layer.
    ("two dogs playing in a park", "a park", ["two dogs playing"]),
    ("an astronaut riding a horse on the moon", "the moon", ["an astronaut riding a horse"]),
    ("a vase of flowers beside a book on a desk", "a desk", ["a vase of flowers", "a book"]),
    ("a robot next to a plant, over a white background", "a white background", ["a robot", "a plant"]),
    ("a deer in a forest", "a forest", ["a deer"]),
    ("a sandcastle and a bucket at the beach", "the beach", ["a sandcastle", "a bucket"]),
    ("a lone tree under a starry sky", "a starry sky", ["a lone tree"]),
    ("a fish beneath the waves", "the waves", ["a fish"]),
    ("a bicycle against a brick wall", "a brick wall", ["a bicycle"]),
    ("a yellow star over a blue background", "a blue background", ["a yellow star"]),
    ("a knight before a castle", "a castle", ["a knight"]),
    ("a cottage by the sea", "the sea", ["a cottage"]),
    ("a tent near a lake", "a lake", ["a tent"]),
    ("a man with mountains in the background", "mountains", ["a man"]),
    ("a snowy village with a sleigh and a reindeer in the foreground", "a snowy village", ["a sleigh", "a reindeer"]),
    ("in a quiet forest, a deer and a fox", "a quiet forest", ["a deer", "a fox"]),
    # "with" describes its object; clothes and times describe what comes before them.
    ("a girl with a red umbrella by the river", "the river", ["a girl with a red umbrella"]),
    ("a woman in a red dress in a garden", "a garden", ["a woman in a red dress"]),
    ("a lighthouse on a cliff at sunset", "a cliff at sunset", ["a lighthouse"]),
    # The last place is the background; earlier ones stay with their object.
    ("a bird on a branch against a blue sky", "a blue sky", ["a bird on a branch"]),
    ("a man standing behind a counter in a shop", "a shop", ["a man standing", "a counter"]),
    # Lists: the Oxford comma, adjectives joined by a comma or "and", bare plurals.
    ("a cup, a teapot, and a spoon on a tray", "a tray", ["a cup", "a teapot", "a spoon"]),
    ("a big, fluffy cat and a small dog on a rug", "a rug", ["a big, fluffy cat", "a small dog"]),
    ("a black and white cat on a sofa", "a sofa", ["a black and white cat"]),
    ("red circles and blue squares on a grey background", "a grey background", ["red circles", "blue squares"]),
    # Style stays in the global prompt only.
    ("a photo of a cat on a sofa", "a sofa", ["a cat"]),
    ("an image of a dog and a ball on the grass", "the grass", ["a dog", "a ball"]),
    ("a high quality photo of a teddy bear on a bed", "a bed", ["a teddy bear"]),
    ("a painting of a boat on a lake, in van gogh style", "a lake", ["a boat"]),
    ("a fox and an owl in a snowy forest, digital art", "a snowy forest", ["a fox", "an owl"]),
    ("a lighthouse on a rocky coast, highly detailed, 4k, by greg rutkowski", "a rocky coast", ["a lighthouse"]),
    ("a photograph of a barn in a field in the style of monet", "a field", ["a barn"]),
    # No background named: the sampler's default.
    ("a red circle and a blue square", BACKGROUND_PROMPT, ["a red circle", "a blue square"]),
    # Case is kept; a full stop is dropped.
    ("A Dog and a Cat on the Moon.", "the Moon", ["A Dog", "a Cat"]),
]


@pytest.mark.parametrize("text, background, layers", REAL_WORLD, ids=[row[0] for row in REAL_WORLD])
def test_real_world_prompts(text, background, layers):
    assert _layers(text) == [background, *layers]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "the prompt is empty"),
        ("a cat", "one object and no background named, in 'a cat'"),
        ("a woman in a red dress", "one object and no background named"),
        ("a city at night", "one object and no background named"),
        ("a photo of a cat, digital art", "one object and no background named, in 'a cat'"),
        ("on a table", "a place and no object before it"),
        ("a cat or a dog on a sofa", "'or' offers alternatives"),
        ("a cat on a mat next to a dog", "the background 'a mat next to a dog' lists several things"),
        ("a cat and , a dog on a mat", "an empty item in the list"),
    ],
)
def test_unsplittable_prompts_are_refused_honestly(text, reason):
    with pytest.raises(PromptSplitError) as e:
        split_prompt(text)
    assert str(e.value).startswith(UNSPLITTABLE) and reason in str(e.value) and "\n" not in str(e.value)


def test_more_objects_than_the_model_takes_are_refused():
    text = "a red circle, a blue square and a green triangle on a white background"
    assert len(split_prompt(text, max_layers=4).layer_prompts) == 3
    with pytest.raises(PromptSplitError, match=r"names 3 objects, 4 layers .* at most 3 layers \(2 objects\)"):
        split_prompt(text, max_layers=3)
    with pytest.raises(ValueError, match="max_layers must be >= 2"):
        split_prompt(text, max_layers=1)


def test_sample_cli_splits_a_prompt_alone(tmp_path, capsys):
    sample_script = load_script("sample")
    base = ["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    args = sample_script.parse_args([*base, "--prompt", "a cat and a lamp in front of a window"])
    assert (args.background_prompt, args.layer_prompt) == ("a window", ["a cat", "a lamp"])
    assert capsys.readouterr().out == "layers from the prompt: background 'a window', layers: 'a cat', 'a lamp'\n"

    args = sample_script.parse_args([*base, "--prompt", "a red circle and a blue square"])
    assert (args.background_prompt, args.layer_prompt) == (BACKGROUND_PROMPT, ["a red circle", "a blue square"])
    args = sample_script.parse_args([*base, "--prompt", "a cat on a sofa", "--background-prompt", "a living room"])
    assert (args.background_prompt, args.layer_prompt) == ("a living room", ["a cat"])  # the user's word wins
    args = sample_script.parse_args([*base, "--prompt", "a cat on a sofa", "--layer-prompt", "a cat on a sofa"])
    assert (args.background_prompt, args.layer_prompt) == (BACKGROUND_PROMPT, ["a cat on a sofa"])  # no split

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_script.parse_args([*base, "--prompt", "a cat"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert f"--prompt without --layer-prompt: {UNSPLITTABLE} (one object" in err and not out
