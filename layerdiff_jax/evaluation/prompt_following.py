"""Does a layered sample show what its prompts of the synthetic vocabulary name?

Rules (each validated on ground-truth synthetic samples by the tests):

- Layer colour: the mean RGB of the layer's foreground image over its binarised mask (alpha >= 0.5),
  mapped to the nearest palette colour (Euclidean distance in sRGB).
- Layer shape: `shapes.classify_shape` of the mask.
- Background colour: over the whole background layer (it is a full-frame layer, so what lies under
  the foregrounds counts too), every pixel votes for the palette colour nearest to it among the
  palette colours *and* their darker pattern tones (`synthetic.darker`), a tone voting for its base
  colour; the most votes wins. A plain mean would be pulled toward the darker tone of striped and
  checked backgrounds (yellow stripes average nearer orange); a foreground left in the background
  layer covers too little of the frame to win the vote.
- Mask softness: `soft_fraction` is the share of the mask's footprint (alpha > 0.2) in the soft band
  0.2 < alpha < 0.8. It grows as shapes shrink (a rim is a larger part of a small shape), so the
  clean flag uses a size-free measure instead: `soft_edge_width` = soft-band pixels per pixel of
  outline (outline = pixels of the binarised mask with a 4-neighbour outside it), i.e. the mean width
  of the soft edge in pixels. Clean means at most `CLEAN_MAX_EDGE_WIDTH` (1.5 px): anti-aliased
  synthetic shapes measure <= 1.1 at every size, the same shapes blurred with a Gaussian of
  sigma >= 1 px measure >= 2.
- Mask non-empty: at least `MIN_AREA_FRACTION` of the image (9 px at 64x64) has alpha >= 0.5.
  A layer whose mask is empty counts as wrong for both colour and shape.

Prompts outside the vocabulary (`parse_foreground_prompt` / `parse_background_prompt` give None) are
not scored for colour or shape; their masks are still measured.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage as ndi

from layerdiff_jax.data.layers import LayeredSample
from layerdiff_jax.data.synthetic import PALETTE, darker, parse_background_prompt, parse_foreground_prompt
from layerdiff_jax.evaluation.shapes import binarise, classify_shape

SOFT_BAND = (0.2, 0.8)
CLEAN_MAX_EDGE_WIDTH = 1.5
MIN_AREA_FRACTION = 0.002

_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[n] for n in _NAMES], np.float64)
# Palette colours followed by their pattern tones; tone j belongs to colour j % len(_NAMES).
_TONES = np.concatenate([_COLOURS, np.array([darker(PALETTE[n]) for n in _NAMES], np.float64)])


def nearest_palette_colour(rgb) -> str:
    """Name of the palette colour nearest (Euclidean, sRGB 0..255) to `rgb`."""
    rgb = np.asarray(rgb, np.float64)
    return _NAMES[int(np.argmin(np.sum((_COLOURS - rgb) ** 2, axis=-1)))]


def layer_colour(foreground: np.ndarray, mask: np.ndarray) -> str | None:
    """Nearest palette colour to the mean of `foreground` (H, W, 3) over the binarised `mask` (H, W) in
    [0, 1]; None when the mask is empty."""
    inside = binarise(mask)
    if not inside.any():
        return None
    return nearest_palette_colour(foreground[inside].astype(np.float64).mean(axis=0))


def palette_votes(image: np.ndarray) -> np.ndarray:
    """(H, W) index into `PALETTE` of the palette colour each pixel of `image` (H, W, 3) is nearest to, a
    pattern tone voting for its base colour."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    # |p - t|^2 = |p|^2 - 2 p.t + |t|^2; |p|^2 is the same for every tone, so it drops out of the argmin.
    nearest = np.argmin(np.sum(_TONES**2, axis=1) - 2 * pixels @ _TONES.T, axis=1) % len(_NAMES)
    return nearest.reshape(image.shape[:2])


def background_colour(background: np.ndarray) -> str:
    """The palette colour that most pixels of `background` (H, W, 3) are nearest to, pattern tones
    counting for their base colour."""
    votes = palette_votes(background).ravel()
    return _NAMES[int(np.argmax(np.bincount(votes, minlength=len(_NAMES))))]


def _soft_band(mask: np.ndarray) -> np.ndarray:
    low, high = SOFT_BAND
    return (mask > low) & (mask < high)


def soft_fraction(mask: np.ndarray) -> float:
    """Share of the mask's footprint (alpha > 0.2) whose alpha lies in (0.2, 0.8); 0 for no footprint."""
    footprint = int((mask > SOFT_BAND[0]).sum())
    return float(_soft_band(mask).sum() / footprint) if footprint else 0.0


def soft_edge_width(mask: np.ndarray) -> float:
    """Soft-band pixels per outline pixel of the binarised mask (outline counted as at least 1)."""
    inside = binarise(mask)
    outline = int((inside & ~ndi.binary_erosion(inside, border_value=0)).sum())
    return float(_soft_band(mask).sum() / max(outline, 1))


def is_non_empty(mask: np.ndarray) -> bool:
    return bool(binarise(mask).sum() >= MIN_AREA_FRACTION * mask.size)


@dataclasses.dataclass(frozen=True)
class LayerScore:
    """One foreground layer. expected_* are None when its prompt is outside the vocabulary."""

    prompt: str
    expected_colour: str | None
    expected_shape: str | None
    colour: str | None  # measured; None for an empty mask
    shape: str | None
    soft_fraction: float
    soft_edge_width: float
    clean: bool
    non_empty: bool

    @property
    def scored(self) -> bool:
        return self.expected_colour is not None

    @property
    def colour_correct(self) -> bool:
        return self.non_empty and self.colour == self.expected_colour

    @property
    def shape_correct(self) -> bool:
        return self.non_empty and self.shape == self.expected_shape

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if self.scored:
            out.update(colour_correct=self.colour_correct, shape_correct=self.shape_correct)
        return out


@dataclasses.dataclass(frozen=True)
class SampleScore:
    name: str
    num_layers: int
    background_prompt: str
    expected_background: str | None  # None when the background prompt is outside the vocabulary
    background: str
    layers: list[LayerScore]

    @property
    def background_correct(self) -> bool:
        return self.background == self.expected_background

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "num_layers": self.num_layers,
            "background": {
                "prompt": self.background_prompt,
                "expected_colour": self.expected_background,
                "colour": self.background,
            },
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.expected_background is not None:
            out["background"]["colour_correct"] = self.background_correct
        return out


def score_layer(prompt: str, foreground: np.ndarray, mask: np.ndarray) -> LayerScore:
    """foreground (H, W, 3) uint8, mask (H, W) alpha in [0, 1]."""
    expected = parse_foreground_prompt(prompt)
    non_empty = is_non_empty(mask)
    width = soft_edge_width(mask)
    return LayerScore(
        prompt=prompt,
        expected_colour=expected[0] if expected else None,
        expected_shape=expected[1] if expected else None,
        colour=layer_colour(foreground, mask) if non_empty else None,
        shape=classify_shape(mask) if non_empty else None,
        soft_fraction=soft_fraction(mask),
        soft_edge_width=width,
        clean=width <= CLEAN_MAX_EDGE_WIDTH,
        non_empty=non_empty,
    )


def score_sample(sample: LayeredSample, name: str = "") -> SampleScore:
    masks = sample.masks.astype(np.float64) / 255.0
    expected_bg = parse_background_prompt(sample.layer_prompts[0])
    return SampleScore(
        name=name,
        num_layers=sample.num_layers,
        background_prompt=sample.layer_prompts[0],
        expected_background=expected_bg[0] if expected_bg else None,
        background=background_colour(sample.background),
        layers=[
            score_layer(prompt, fg, mask)
            for prompt, fg, mask in zip(sample.layer_prompts[1:], sample.foregrounds, masks)
        ],
    )


def _rate(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def summarise(scores: list[SampleScore]) -> dict:
    """Accuracies and rates over `scores` (None where nothing was there to score)."""
    layers = [layer for s in scores for layer in s.layers]
    scored = [layer for layer in layers if layer.scored]
    backgrounds = [s for s in scores if s.expected_background is not None]
    return {
        "num_samples": len(scores),
        "num_layers_scored": len(scored),
        "num_layers_unscored": len(layers) - len(scored),
        "layer_colour_accuracy": _rate([layer.colour_correct for layer in scored]),
        "shape_accuracy": _rate([layer.shape_correct for layer in scored]),
        "background_colour_accuracy": _rate([s.background_correct for s in backgrounds]),
        "clean_mask_rate": _rate([layer.clean for layer in layers]),
        "non_empty_mask_rate": _rate([layer.non_empty for layer in layers]),
    }
