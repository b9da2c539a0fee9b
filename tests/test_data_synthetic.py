"""The procedural dataset: determinism, geometry, and prompts that name what the pixels show."""

import numpy as np
import pytest

from layerdiff_jax.data.synthetic import (
    PALETTE,
    PATTERNS,
    SHAPES,
    SIZE_RANGE,
    darker,
    generate_sample,
    nearest_colours,
    parse_background_prompt,
    parse_foreground_prompt,
    parse_colour_weights,
    parse_layer_mix,
)

RESOLUTION = 64


def _colour_name(rgb) -> str:
    names = [name for name, value in PALETTE.items() if tuple(value) == tuple(rgb)]
    assert len(names) == 1, f"{tuple(rgb)} is not a palette colour"
    return names[0]


def _shape_from_mask(mask: np.ndarray) -> str:
    """Classify a binary mask from its pixels: a square fills its box, a triangle widens downward."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if box.mean() > 0.97:
        return "square"
    widths = box.sum(axis=1)
    return "triangle" if widths[: len(widths) // 3].mean() < 0.6 * widths[-(len(widths) // 3) :].mean() else "circle"


def _pattern_from_pixels(background: np.ndarray) -> str:
    if len(np.unique(background.reshape(-1, 3), axis=0)) == 1:
        return "plain"
    rows_constant = (background == background[:, :1]).all()
    cols_constant = (background == background[:1, :]).all()
    return "striped" if rows_constant or cols_constant else "checked"


@pytest.mark.parametrize("index", range(20))
def test_prompts_name_what_is_drawn_and_masks_do_not_overlap(index):
    s = generate_sample(7, index, resolution=RESOLUTION)
    n = s.num_layers
    assert 2 <= n <= 4 and len(s.foregrounds) == len(s.masks) == n - 1
    assert set(np.unique(s.masks)) <= {0, 255}
    assert (s.masks.astype(int).sum(axis=0) <= 255).all(), "foreground masks overlap"

    # Background: palette colour plus (for patterns) its darker tone, pattern read from pixels.
    bg_colours = np.unique(s.background.reshape(-1, 3), axis=0)
    base = [c for c in bg_colours if tuple(c) in {tuple(v) for v in PALETTE.values()}]
    assert len(base) == 1
    bg_name = _colour_name(base[0])
    assert {tuple(c) for c in bg_colours} <= {PALETTE[bg_name], darker(PALETTE[bg_name])}
    assert parse_background_prompt(s.layer_prompts[0]) == (bg_name, _pattern_from_pixels(s.background))

    composite = s.composite()
    for i, (fg, mask) in enumerate(zip(s.foregrounds, s.masks), start=1):
        inside = mask > 0
        colours = np.unique(fg[inside], axis=0)
        assert len(colours) == 1
        assert (composite[inside] == colours[0]).all()
        drawn = (_colour_name(colours[0]), _shape_from_mask(inside))
        assert parse_foreground_prompt(s.layer_prompts[i]) == drawn
        assert drawn[0] != bg_name
        # Drawn inside its recorded box, which is 15%..45% of the side and inside the frame.
        box = s.metadata["foregrounds"][i - 1]
        top, left, size = box["top"], box["left"], box["size"]
        assert SIZE_RANGE[0] * RESOLUTION <= size <= SIZE_RANGE[1] * RESOLUTION
        assert top >= 0 and left >= 0 and top + size <= RESOLUTION and left + size <= RESOLUTION
        rows, cols = np.nonzero(inside)
        assert top <= rows.min() and rows.max() < top + size and left <= cols.min() and cols.max() < left + size
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= size - 2
    # The global prompt lists every layer's phrase, deepest first, then the background.
    positions = [s.global_prompt.index(p) for p in s.layer_prompts[1:]]
    assert positions == sorted(positions)
    assert s.global_prompt.endswith(" on " + s.layer_prompts[0])


def test_the_dataset_uses_the_whole_vocabulary():
    samples = [generate_sample(0, i, resolution=32) for i in range(60)]
    fg = {parse_foreground_prompt(p) for s in samples for p in s.layer_prompts[1:]}
    bg = {parse_background_prompt(s.layer_prompts[0]) for s in samples}
    assert {c for c, _ in fg} == set(PALETTE) and {s for _, s in fg} == set(SHAPES)
    assert {p for _, p in bg} == set(PATTERNS)
    assert {s.num_layers for s in samples} == {2, 3, 4}


def test_deterministic_per_seed_and_index_in_any_order():
    a = [generate_sample(1, i, resolution=32) for i in (3, 4)]
    b = [generate_sample(1, i, resolution=32) for i in (4, 3)][::-1]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.background, y.background)
        np.testing.assert_array_equal(x.foregrounds, y.foregrounds)
        np.testing.assert_array_equal(x.masks, y.masks)
        assert x.layer_prompts == y.layer_prompts and x.metadata == y.metadata
    other = generate_sample(2, 3, resolution=32)
    assert other.global_prompt != a[0].global_prompt or not np.array_equal(other.background, a[0].background)


def test_layer_mix_and_resolution():
    assert {generate_sample(0, i, 32, {3: 1.0}).num_layers for i in range(10)} == {3}
    counts = [generate_sample(0, i, 32, parse_layer_mix("2:0.8,4:0.2")).num_layers for i in range(100)]
    assert set(counts) == {2, 4} and 65 <= counts.count(2) <= 95
    big = generate_sample(0, 0, resolution=256)
    assert big.background.shape == (256, 256, 3) and big.masks.shape[1:] == (256, 256)


@pytest.mark.parametrize("text", ["2", "2:x", "1:1.0", "2:-1,3:1", ""])
def test_bad_layer_mix_is_rejected(text):
    with pytest.raises(ValueError, match="layer mix"):
        parse_layer_mix(text)


def test_colour_weights_draw_hard_colours_more_often_and_leave_the_default_draw_alone():
    def black_share(weights):
        colours = [f["colour"] for i in range(300) for f in generate_sample(0, i, 32, {4: 1.0}, weights).metadata["foregrounds"]]
        return colours.count("black") / len(colours)

    assert black_share(None) < 0.2 and black_share(parse_colour_weights("black:4")) > 0.3
    # No weights draw as before: held-out requests and built datasets stay what they were.
    assert generate_sample(7, 3).layer_prompts == generate_sample(7, 3, colour_weights={}).layer_prompts
    assert parse_colour_weights("") == {}


def test_similar_colours_put_near_colours_side_by_side_and_leave_the_default_draw_alone():
    def near_share(rate):
        near = total = 0
        for i in range(200):
            meta = generate_sample(0, i, 32, {3: 1.0}, similar_colours=rate).metadata
            colours = [meta["background"]["colour"]] + [f["colour"] for f in meta["foregrounds"]]
            near += sum(b in nearest_colours(a) for a, b in zip(colours, colours[1:]))
            total += len(colours) - 1
        return near / total

    assert nearest_colours("red") == ["orange", "yellow"] and nearest_colours("blue") == ["purple", "green"]
    assert near_share(0.0) < 0.4 and near_share(1.0) > 0.9
    sample = generate_sample(0, 5, 32, {4: 1.0}, similar_colours=1.0)
    assert len({tuple(f[k] for k in ("colour", "shape")) for f in sample.metadata["foregrounds"]}) == 3  # distinct objects
    assert generate_sample(7, 3).layer_prompts == generate_sample(7, 3, similar_colours=0.0).layer_prompts
    with pytest.raises(ValueError, match="similar_colours"):
        generate_sample(7, 3, similar_colours=1.5)


@pytest.mark.parametrize("text", ["pink:2", "black", "black:0", "black:x"])
def test_bad_colour_weights_are_rejected(text):
    with pytest.raises(ValueError, match="colour weights"):
        parse_colour_weights(text)


def test_prompt_parsers_reject_other_phrases():
    assert parse_foreground_prompt("an orange triangle") == ("orange", "triangle")
    assert parse_foreground_prompt("a pink circle") is None
    assert parse_background_prompt("a white checked background") == ("white", "checked")
    assert parse_background_prompt("the background") is None


def test_contrast_fill_puts_dark_objects_on_white_and_changes_nothing_the_masks_show():
    found_dark = False
    for index in range(20):
        black = generate_sample(3, index, 32, {4: 1.0})
        contrast = generate_sample(3, index, 32, {4: 1.0}, foreground_fill="contrast")
        np.testing.assert_array_equal(black.masks, contrast.masks)
        np.testing.assert_array_equal(black.composite(), contrast.composite())
        assert black.layer_prompts == contrast.layer_prompts
        for fg_black, fg_contrast, mask, meta in zip(black.foregrounds, contrast.foregrounds, black.masks, black.metadata["foregrounds"]):
            outside = np.all(fg_black == 0, axis=-1) & (mask == 0)
            expected = 255 if meta["colour"] == "black" else 0
            assert outside.any() and np.all(fg_contrast[outside] == expected)
            found_dark |= meta["colour"] == "black"
    assert found_dark
    with pytest.raises(ValueError, match="expected one of black, contrast"):
        generate_sample(3, 5, foreground_fill="grey")
