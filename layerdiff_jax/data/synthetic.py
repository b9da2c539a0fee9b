"""A procedural layered dataset: solid shapes on plain, striped or checked backgrounds.

Deterministic per `(seed, index)`, so any sample can be generated on its own (random access). The
vocabulary is fixed so that generated images can be scored against their prompts; evaluation
imports `PALETTE`, `SHAPES` and `PATTERNS` from here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from layerdiff_jax.data.layers import LayeredSample, cut_foreground

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("plain", "striped", "checked")
SIZE_RANGE = (0.25, 0.45)  # shape side as a fraction of the image side: at 64 px and a 4x VAE, at least 4 latent pixels
PATTERN_DARKEN = 0.6  # stripes/checks use this fraction of the background colour
SHAPE_GAP = 2  # pixels kept free between shapes, so 5x5-dilated cuts never reach another shape
# Outside a foreground layer's cut: black, or "contrast": white behind an object darker than DARK_LUMA, so that a
# black object differs from an empty layer in its image latent, not only in its mask.
FOREGROUND_FILLS = ("black", "contrast")
DARK_LUMA = 64
DEFAULT_LAYER_MIX: dict[int, float] = {2: 1 / 3, 3: 1 / 3, 4: 1 / 3}  # total layers -> probability
_LAYOUT_TRIES, _BOX_TRIES = 100, 200
SIMILAR_COLOURS = 2  # a hard case's layer is drawn in one of its anchor's this many nearest palette colours


def darker(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pattern tone of a background colour."""
    return tuple(int(round(c * PATTERN_DARKEN)) for c in colour)


def surround(colour: tuple[int, int, int], foreground_fill: str) -> tuple[int, int, int]:
    """What a foreground layer of an object in `colour` shows outside its cut (`FOREGROUND_FILLS`)."""
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]  # ITU-R 601, the weights of PIL's greyscale
    return (255, 255, 255) if foreground_fill == "contrast" and luma < DARK_LUMA else (0, 0, 0)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def foreground_prompt(colour: str, shape: str) -> str:
    """'a red circle', 'an orange square'."""
    return f"{_article(colour)} {colour} {shape}"


def background_prompt(colour: str, pattern: str) -> str:
    """'a blue background', 'an orange striped background'."""
    described = colour if pattern == "plain" else f"{colour} {pattern}"
    return f"{_article(colour)} {described} background"


def parse_foreground_prompt(prompt: str) -> tuple[str, str] | None:
    """(colour, shape) named by a foreground prompt of this vocabulary, or None if it is not one."""
    words = prompt.strip().lower().split()
    if len(words) == 3 and words[0] in ("a", "an") and words[1] in PALETTE and words[2] in SHAPES:
        return words[1], words[2]
    return None


def parse_background_prompt(prompt: str) -> tuple[str, str] | None:
    """(colour, pattern) named by a background prompt of this vocabulary, or None if it is not one."""
    words = prompt.strip().lower().split()
    if len(words) in (3, 4) and words[0] in ("a", "an") and words[1] in PALETTE and words[-1] == "background":
        pattern = words[2] if len(words) == 4 else "plain"
        if pattern in PATTERNS:
            return words[1], pattern
    return None


def global_prompt(foreground_prompts: list[str], background: str) -> str:
    """'a red circle, a blue square and a green triangle on a white striped background'."""
    if len(foreground_prompts) > 1:
        objects = ", ".join(foreground_prompts[:-1]) + " and " + foreground_prompts[-1]
    else:
        objects = foreground_prompts[0]
    return f"{objects} on {background}"


def parse_layer_mix(text: str) -> dict[int, float]:
    """'2:0.34,3:0.33,4:0.33' -> {2: 0.34, 3: 0.33, 4: 0.33} (normalised)."""
    mix = {}
    for part in text.split(","):
        try:
            layers, weight = part.split(":")
            mix[int(layers)] = float(weight)
        except ValueError:
            raise ValueError(f"layer mix {text!r}: expected 'layers:weight,...', e.g. '2:0.5,3:0.5'") from None
    return _check_layer_mix(mix)


def parse_colour_weights(text: str) -> dict[str, float]:
    """'black:3,yellow:2' -> {'black': 3.0, 'yellow': 2.0}: how much more often a foreground takes a colour (colours
    not named weigh 1; '' weighs all alike)."""
    weights = {}
    for part in filter(None, text.split(",")):
        colour, _, weight = part.partition(":")
        try:
            weights[colour.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"colour weights {text!r}: expected 'colour:weight,...', e.g. 'black:3,yellow:2'") from None
    return _check_colour_weights(weights)


def _check_colour_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(PALETTE))
    if unknown or any(not w > 0 for w in weights.values()):
        raise ValueError(f"colour weights {dict(weights)}: need colours of {list(PALETTE)} with positive weights")
    return dict(weights)


def _check_layer_mix(mix: Mapping[int, float]) -> dict[int, float]:
    bad = [n for n in mix if not 2 <= n <= 1 + len(SHAPES) * (len(PALETTE) - 1)]
    if bad or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"layer mix {dict(mix)}: needs layer counts >= 2 with non-negative weights summing > 0")
    total = sum(mix.values())
    return {n: w / total for n, w in sorted(mix.items())}


def shape_mask(shape: str, top: int, left: int, size: int, resolution: int) -> np.ndarray:
    """Binary (resolution, resolution) mask of `shape` filling the box [top, top+size) x [left, left+size).

    Pixels are tested at their centres; the triangle stands on the box's bottom edge, apex up.
    """
    y, x = np.mgrid[0:resolution, 0:resolution] + 0.5
    v, u = (y - top) / size, (x - left) / size  # box coordinates in [0, 1]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return inside & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _place_boxes(rng: np.random.Generator, count: int, resolution: int) -> list[tuple[int, int, int]]:
    """`count` square boxes (top, left, size), inside the frame and SHAPE_GAP apart.

    Rejection sampling; a layout whose early boxes leave no room for the next one starts over.
    """
    lo = max(1, int(np.ceil(SIZE_RANGE[0] * resolution)))
    hi = max(lo, int(np.floor(SIZE_RANGE[1] * resolution)))
    for _ in range(_LAYOUT_TRIES):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(_BOX_TRIES):
            if len(boxes) == count:
                return boxes
            size = int(rng.integers(lo, hi + 1))
            top, left = (int(v) for v in rng.integers(0, resolution - size + 1, size=2))
            if all(_apart((top, left, size), box) for box in boxes):
                boxes.append((top, left, size))
        if len(boxes) == count:
            return boxes
    raise RuntimeError(f"could not place {count} shapes at {resolution}x{resolution}; use a larger resolution")


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ta, la, sa), (tb, lb, sb) = a, b
    g = SHAPE_GAP
    return ta >= tb + sb + g or tb >= ta + sa + g or la >= lb + sb + g or lb >= la + sa + g


def _background(rng: np.random.Generator, colour: str, pattern: str, resolution: int) -> np.ndarray:
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = PALETTE[colour]
    if pattern == "plain":
        return image
    band = int(rng.integers(max(2, resolution // 16), max(3, resolution // 6) + 1))  # stripe/check width
    y, x = np.mgrid[0:resolution, 0:resolution] // band
    if pattern == "striped":
        dark = (y if rng.random() < 0.5 else x) % 2 == 1
    else:
        dark = (y + x) % 2 == 1
    image[dark] = darker(PALETTE[colour])
    return image


def nearest_colours(colour: str, count: int = SIMILAR_COLOURS) -> list[str]:
    """The `count` palette colours nearest to `colour` (Euclidean, sRGB), nearest first."""
    rgb = np.array(PALETTE[colour], np.float64)
    others = [c for c in PALETTE if c != colour]
    return sorted(others, key=lambda c: float(np.sum((np.array(PALETTE[c]) - rgb) ** 2)))[:count]


def _similar_colour_pairs(rng: np.random.Generator, pairs: list[tuple[str, str]], bg_colour: str, count: int) -> list[tuple[str, str]]:
    """`count` distinct (colour, shape) pairs from `pairs`, each in a colour near the previous layer's (the
    background's for the first): the scenes where a layer most easily takes its neighbour's colour."""
    chosen: list[tuple[str, str]] = []
    anchor = bg_colour
    for _ in range(count):
        close, used = nearest_colours(anchor), {c for c, _ in chosen}
        free = [p for p in pairs if p not in chosen]
        near = [p for p in free if p[0] in close]
        unused = [p for p in near if p[0] not in used]  # a new colour where one is near
        pool = unused or near or free
        chosen.append(pool[rng.integers(len(pool))])
        anchor = chosen[-1][0]
    return chosen


def generate_sample(
    seed: int,
    index: int,
    resolution: int = 64,
    layer_mix: Mapping[int, float] | None = None,
    colour_weights: Mapping[str, float] | None = None,
    foreground_fill: str = "black",
    similar_colours: float = 0.0,
) -> LayeredSample:
    """Sample `index` of the synthetic dataset with `seed`; the same arguments give the same sample.
    `colour_weights` (`parse_colour_weights`) draws foregrounds of some colours more often than others;
    `foreground_fill` (`FOREGROUND_FILLS`) is what a foreground layer shows outside its cut; `similar_colours`
    is the fraction of samples whose foregrounds are drawn in colours close to one already in the scene."""
    if not 0.0 <= similar_colours <= 1.0:
        raise ValueError(f"similar_colours={similar_colours}: expected a probability in [0, 1]")
    if foreground_fill not in FOREGROUND_FILLS:
        raise ValueError(f"foreground fill {foreground_fill!r}: expected one of {', '.join(FOREGROUND_FILLS)}")
    mix = _check_layer_mix(DEFAULT_LAYER_MIX if layer_mix is None else layer_mix)
    rng = np.random.default_rng([seed, index])
    num_layers = int(rng.choice(list(mix), p=list(mix.values())))
    colours = list(PALETTE)
    bg_colour = colours[rng.integers(len(colours))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    background = _background(rng, bg_colour, pattern, resolution)

    # Distinct (colour, shape) pairs, none in the background colour.
    pairs = [(c, s) for c, s in itertools.product(colours, SHAPES) if c != bg_colour]
    if similar_colours and rng.random() < similar_colours:
        chosen = _similar_colour_pairs(rng, pairs, bg_colour, num_layers - 1)
    else:
        if colour_weights:
            weights = np.array([_check_colour_weights(colour_weights).get(c, 1.0) for c, _ in pairs])
            picks = rng.choice(len(pairs), size=num_layers - 1, replace=False, p=weights / weights.sum())
        else:  # the unweighted draw, which the datasets and held-out requests made so far were drawn with
            picks = rng.choice(len(pairs), size=num_layers - 1, replace=False)
        chosen = [pairs[i] for i in picks]
    boxes = _place_boxes(rng, num_layers - 1, resolution)

    # Shapes never overlap, so painting order does not matter; the layer order is the random draw order.
    image = background.copy()
    masks = np.stack([shape_mask(s, *box, resolution) for (_, s), box in zip(chosen, boxes)])
    for (colour, _), mask in zip(chosen, masks):
        image[mask] = PALETTE[colour]
    masks = masks.astype(np.uint8) * 255
    fills = [surround(PALETTE[c], foreground_fill) for c, _ in chosen]
    foregrounds = np.stack([cut_foreground(image, m, fill) for m, fill in zip(masks, fills)])

    fg_prompts = [foreground_prompt(c, s) for c, s in chosen]
    bg_prompt = background_prompt(bg_colour, pattern)
    metadata = {
        "source": "synthetic",
        "seed": seed,
        "index": index,
        "background": {"colour": bg_colour, "pattern": pattern},
        "foregrounds": [
            {"colour": c, "shape": s, "top": t, "left": l, "size": z} for (c, s), (t, l, z) in zip(chosen, boxes)
        ],
    }
    return LayeredSample(
        background=background,
        foregrounds=foregrounds,
        masks=masks,
        global_prompt=global_prompt(fg_prompts, bg_prompt),
        layer_prompts=[bg_prompt, *fg_prompts],
        metadata=metadata,
    )
