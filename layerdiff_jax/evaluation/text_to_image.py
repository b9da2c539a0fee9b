"""Does a text-to-image model (the toy base) draw what a flat prompt of the synthetic vocabulary names?

Requests come from held-out synthetic samples (a seed the base's pretraining data never uses):

- single objects, "a red circle on a blue background": the silhouette is every pixel whose palette tone
  (palette colours and their pattern tones, as `prompt_following.background_colour` votes) is not the
  known background colour; the object's colour is the nearest palette colour to the silhouette's mean,
  its shape `shapes.classify_shape` of the silhouette, and the background is right when most pixels vote
  for its colour.
- composites, "a red circle and a blue square on a white striped background": for each named object, the
  pixels nearest to its colour (among every palette tone) form its silhouette; the object counts as
  present when that silhouette is non-empty and as the right shape when `classify_shape` agrees; the
  background as above.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from layerdiff_jax.data.layers import LayeredSample
from layerdiff_jax.data.loader import single_object_view
from layerdiff_jax.data.synthetic import (
    PALETTE,
    background_prompt,
    foreground_prompt,
    generate_sample,
    global_prompt,
)
from layerdiff_jax.evaluation.prompt_following import (
    MIN_AREA_FRACTION,
    background_colour,
    nearest_palette_colour,
    palette_votes,
)
from layerdiff_jax.evaluation.shapes import classify_shape

BASE_EVAL_SEED = 2_000_000  # held out of every training set: the base's pretraining data uses seed 0


@dataclasses.dataclass(frozen=True)
class FlatRequest:
    prompt: str
    background: str  # the background's palette colour
    objects: tuple[tuple[str, str], ...]  # (colour, shape) of each object the prompt names


def _single_object_samples(count: int, seed: int) -> list[LayeredSample]:
    return [generate_sample(seed, index, layer_mix={2: 1.0}) for index in range(count)]


def _composite_samples(count: int, seed: int, layer_mix: dict[int, float] | None = None) -> list[LayeredSample]:
    return [generate_sample(seed + 1, index, layer_mix=layer_mix or {3: 0.5, 4: 0.5}) for index in range(count)]


def single_object_requests(count: int, seed: int = BASE_EVAL_SEED) -> list[FlatRequest]:
    """`count` prompts "a <colour> <shape> on a <colour> background" from held-out synthetic samples."""
    requests = []
    for s in _single_object_samples(count, seed):
        (obj,) = s.metadata["foregrounds"]
        bg = s.metadata["background"]["colour"]
        prompt = global_prompt([foreground_prompt(obj["colour"], obj["shape"])], background_prompt(bg, "plain"))
        requests.append(FlatRequest(prompt, bg, ((obj["colour"], obj["shape"]),)))
    return requests


def composite_requests(count: int, seed: int = BASE_EVAL_SEED, layer_mix: dict[int, float] | None = None) -> list[FlatRequest]:
    """`count` global prompts of held-out synthetic samples with 2 to 4 layers."""
    requests = []
    for s in _composite_samples(count, seed, layer_mix):
        objects = tuple((f["colour"], f["shape"]) for f in s.metadata["foregrounds"])
        requests.append(FlatRequest(s.global_prompt, s.metadata["background"]["colour"], objects))
    return requests


def reference_images(count: int, seed: int = BASE_EVAL_SEED) -> tuple[dict[str, np.ndarray], list[LayeredSample]]:
    """The ground truth behind the requests: ({"single object": images, "composite": images}, in the order
    of `single_object_requests` and `composite_requests`, uint8), and the composites' layered samples."""
    singles = _single_object_samples(count, seed)
    composites = _composite_samples(count, seed)
    images = {
        "single object": np.stack([single_object_view(s, 1, s.metadata["background"]["colour"])[0] for s in singles]),
        "composite": np.stack([s.composite() for s in composites]),
    }
    return images, composites


def score_flat(image: np.ndarray, request: FlatRequest) -> dict[str, float]:
    """Scores of one generated uint8 image (H, W, 3): background, and per object colour and shape (means)."""
    names = palette_votes(image)
    palette = list(PALETTE)
    min_area = MIN_AREA_FRACTION * names.size
    scores = {"background": float(background_colour(image) == request.background)}
    colour_hits, shape_hits = [], []
    for colour, shape in request.objects:
        if len(request.objects) == 1:
            silhouette = names != palette.index(request.background)
            ok = silhouette.sum() >= min_area
            colour_ok = ok and nearest_palette_colour(image[silhouette].astype(np.float64).mean(axis=0)) == colour
        else:
            silhouette = names == palette.index(colour)
            colour_ok = ok = silhouette.sum() >= min_area
        colour_hits.append(float(colour_ok))
        shape_hits.append(float(ok and classify_shape(silhouette.astype(np.float32)) == shape))
    scores["colour"] = float(np.mean(colour_hits))
    scores["shape"] = float(np.mean(shape_hits))
    return scores


def score_requests(images: np.ndarray, requests: Sequence[FlatRequest]) -> dict[str, float]:
    """Mean scores over generated images, one per request, with the count."""
    rows = [score_flat(image, request) for image, request in zip(images, requests, strict=True)]
    return {"n": len(rows), **{key: round(float(np.mean([r[key] for r in rows])), 3) for key in rows[0]}}


def evaluate_base(
    pipeline, *, count: int = 48, guidances: Sequence[float] = (3.0,), steps: int = 25, seed: int = 0, size: int = 64
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, np.ndarray]]:
    """A text-to-image pipeline's scores on `count` held-out single-object and composite prompts at each
    guidance scale: ({"guidance 3": {"single object": scores, "composite": scores}}, {name: images})."""
    sets = {"single object": single_object_requests(count), "composite": composite_requests(count)}
    results, images = {}, {}
    for guidance in guidances:
        key = f"guidance {guidance:g}"
        results[key] = {}
        for name, requests in sets.items():
            generated = pipeline.generate([r.prompt for r in requests], steps=steps, guidance=guidance, seed=seed, size=size)
            results[key][name] = score_requests(generated, requests)
            images[f"{key}, {name}"] = generated
    return results, images


def format_base_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per guidance scale and prompt set."""
    lines = [f"{'':>12}  {'prompts':>13}  {'n':>3}  {'colour':>6}  {'shape':>6}  {'bg colour':>9}"]
    for key, sets in results.items():
        for name, s in sets.items():
            lines.append(f"{key:>12}  {name:>13}  {s['n']:>3}  {s['colour']:>6.3f}  {s['shape']:>6.3f}  {s['background']:>9.3f}")
    return "\n".join(lines)
