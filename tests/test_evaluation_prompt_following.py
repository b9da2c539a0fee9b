"""Prompt-following rules on ground truth (near-perfect), imperfect masks (robust) and wrong samples (low)."""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi

from layerdiff_jax.data.layers import LayeredSample
from layerdiff_jax.data.synthetic import (
    PALETTE,
    SHAPES,
    foreground_prompt,
    generate_sample,
    parse_foreground_prompt,
    shape_mask,
)
from layerdiff_jax.evaluation import prompt_following as pf
from layerdiff_jax.evaluation.shapes import IRREGULAR, classify_shape, template_ious

RES = 64
SIZES = range(10, 29)  # 10 to 28 px: the 64 px dataset's shape sizes (SIZE_RANGE of 64 px) and smaller


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(11, i, RES) for i in range(200)]


def _antialiased(shape, size, rng, angle=0.0, supersample=4):
    """`shape` drawn at 4x, rotated about its centre, box-downsampled, then moved to a random spot."""
    big = RES * supersample
    corner = (big - size * supersample) // 2 + int(rng.integers(supersample))  # sub-pixel offset
    m = shape_mask(shape, corner, corner, size * supersample, big).astype(float)
    if angle:
        m = ndi.rotate(m, angle, reshape=False, order=1)
    m = m.reshape(RES, supersample, RES, supersample).mean(axis=(1, 3))
    shift = (RES - size) // 2 - 3
    return np.roll(m, tuple(rng.integers(-shift, shift + 1, 2)), axis=(0, 1))


def test_shapes_of_ground_truth_masks_at_every_size():
    masks, truth = [], []
    for size in SIZES:
        for shape in SHAPES:
            for top, left in ((0, 0), (3, 5), (7, 2), (11, 13), (64 - size, 64 - size)):
                masks.append(shape_mask(shape, top, left, size, RES).astype(float))
                truth.append(shape)
    assert len(masks) == 285
    predicted = [classify_shape(m) for m in masks]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth)])
    assert accuracy >= 0.98, [(t, p) for p, t in zip(predicted, truth) if p != t]


def test_rules_on_ground_truth_samples_are_perfect(samples):
    summary = pf.summarise([pf.score_sample(s) for s in samples])
    assert summary["num_layers_scored"] > 350 and summary["num_layers_unscored"] == 0
    assert summary["layer_colour_accuracy"] == 1.0
    assert summary["shape_accuracy"] >= 0.98
    assert summary["background_colour_accuracy"] == 1.0
    assert summary["clean_mask_rate"] == 1.0 and summary["non_empty_mask_rate"] == 1.0


def test_shapes_survive_generated_style_imperfections():
    """Anti-aliased, rotated, blurred and noisy masks, binarised inside the classifier."""
    rng = np.random.default_rng(0)
    hits = []
    for size in SIZES:
        for shape in SHAPES:
            for _ in range(5):
                m = _antialiased(shape, size, rng, angle=rng.uniform(-30, 30))
                m = ndi.gaussian_filter(m, rng.uniform(0, 0.8))
                m = np.clip(m + rng.normal(0, 0.1, m.shape), 0, 1)
                m[tuple(rng.integers(0, RES, (2, 3)))] = 1.0  # stray specks away from the shape
                hits.append(classify_shape(m) == shape)
    assert len(hits) == 285 and np.mean(hits) >= 0.98


def test_irregular_and_empty_masks():
    ell = np.zeros((RES, RES))
    ell[10:40, 10:18] = ell[32:40, 10:40] = 1
    bar = np.zeros((RES, RES))
    bar[10:20, 5:45] = 1
    assert classify_shape(ell) == IRREGULAR and classify_shape(bar) == IRREGULAR
    assert classify_shape(np.full((RES, RES), 0.49)) is None and template_ious(np.zeros((RES, RES))) is None


def test_background_vote_beats_the_mean_on_patterns(samples):
    patterned = ("a yellow striped background", "a yellow checked background")
    yellow = [s for s in samples if s.layer_prompts[0] in patterned]
    assert yellow, "no yellow patterned background among the samples"
    for s in yellow:
        assert pf.nearest_palette_colour(s.background.reshape(-1, 3).mean(axis=0)) != "yellow"  # why we vote
        assert pf.background_colour(s.background) == "yellow"
    # Foregrounds left inside the background layer do not outvote it.
    assert all(pf.background_colour(s.composite()) == pf.background_colour(s.background) for s in samples[:50])


def test_clean_flag_tolerates_antialiasing_not_blur():
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        for size in (10, 16, 28):
            sharp = _antialiased(shape, size, rng)
            assert pf.soft_edge_width(sharp) <= 1.1 and pf.is_non_empty(sharp)
            assert pf.soft_edge_width(ndi.gaussian_filter(sharp, 1.0)) >= 2.0
    assert pf.soft_fraction(_antialiased("circle", 10, rng)) > pf.soft_fraction(_antialiased("circle", 28, rng))
    assert pf.soft_edge_width(np.full((RES, RES), 0.5)) > pf.CLEAN_MAX_EDGE_WIDTH  # uniformly unsure
    tiny = np.zeros((RES, RES))
    tiny[:2, :4] = 1  # 8 px < 0.2% of 64x64
    assert not pf.is_non_empty(tiny)


def _with_prompts(sample: LayeredSample, change) -> LayeredSample:
    return dataclasses.replace(sample, layer_prompts=[sample.layer_prompts[0], *map(change, sample.layer_prompts[1:])])


def _other(options, current):
    return options[(options.index(current) + 1) % len(options)]


def test_wrong_prompts_score_low(samples):
    subset = samples[:60]
    colours = list(PALETTE)

    def wrong_colour(p):
        c, s = parse_foreground_prompt(p)
        return foreground_prompt(_other(colours, c), s)

    def wrong_shape(p):
        c, s = parse_foreground_prompt(p)
        return foreground_prompt(c, _other(list(SHAPES), s))

    swapped_colour = pf.summarise([pf.score_sample(_with_prompts(s, wrong_colour)) for s in subset])
    assert swapped_colour["layer_colour_accuracy"] == 0.0 and swapped_colour["shape_accuracy"] >= 0.98
    swapped_shape = pf.summarise([pf.score_sample(_with_prompts(s, wrong_shape)) for s in subset])
    assert swapped_shape["shape_accuracy"] <= 0.02 and swapped_shape["layer_colour_accuracy"] == 1.0

    def wrong_background(s):
        colour = s.metadata["background"]["colour"]
        prompt = s.layer_prompts[0].replace(colour, _other(colours, colour), 1)
        return dataclasses.replace(s, layer_prompts=[prompt, *s.layer_prompts[1:]])

    wrong_bg = [wrong_background(s) for s in subset]
    assert pf.summarise([pf.score_sample(s) for s in wrong_bg])["background_colour_accuracy"] == 0.0


def test_empty_blurred_and_unparsed_layers(samples):
    s = next(s for s in samples if s.num_layers >= 3)
    masks = s.masks.copy()
    masks[0] = 0  # empty: wrong colour and shape whatever the prompt says
    blurred = ndi.gaussian_filter(s.masks[-1].astype(float), 2.0)
    masks[-1] = np.round(blurred).astype(np.uint8)
    broken = dataclasses.replace(s, masks=masks)
    layers = pf.score_sample(broken).layers
    assert not layers[0].non_empty and not layers[0].colour_correct and not layers[0].shape_correct
    assert layers[0].colour is None and layers[0].shape is None
    assert layers[-1].non_empty and not layers[-1].clean

    free_text = _with_prompts(s, lambda p: "a cat wearing a hat")
    summary = pf.summarise([pf.score_sample(free_text)])
    assert summary["num_layers_scored"] == 0 and summary["num_layers_unscored"] == s.num_layers - 1
    assert summary["layer_colour_accuracy"] is None and summary["clean_mask_rate"] == 1.0
