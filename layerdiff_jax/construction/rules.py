"""The decisions of data construction that are ours, on plain numpy arrays (paper Appendix A.2).

- Phrase filtering: drop phrases whose head word names background stuff ("the lighting",
  "a white background"), pronouns, and repeats.
- Detection de-duplication: one box per object when several phrases find it.
- Saliency filter: keep a mask when more than `min_overlap` (10%) of its pixels are salient.
- Depth order: mean depth inside each mask, deepest first.
- Overlaps: a pixel claimed by several masks goes to the front-most (shallowest) layer, so training
  masks never overlap.
- Rejection: an inpainted background is rejected when more than `max_fraction` of the hole is salient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from layerdiff_jax.construction.stages import Detection

# Head words of phrases that describe the scene rather than an object: they stay in the background.
BACKGROUND_WORDS = frozenset(
    "background backdrop foreground lighting sunlight shadow shade floor ground wall ceiling sky "
    "cloud horizon grass field road street pavement water sea ocean beach sand snow room scene view "
    "image picture photo photograph photography illustration render rendering style color colour "
    "texture pattern surface area distance middle center centre left right "
    "corner edge day night sunset sunrise air atmosphere setting environment landscape scenery "
    "close-up closeup shot camera focus blur bokeh detail".split()
)
PRONOUNS = frozenset(
    "it its they them this that these those there he she him her we you i one something someone".split()
)


def head_word(phrase: str) -> str:
    """The last word of a phrase, lower-cased, without surrounding punctuation."""
    words = phrase.lower().split()
    return words[-1].strip(".,;:!?\"'()") if words else ""


def is_background_phrase(phrase: str, stop_words: frozenset[str] = BACKGROUND_WORDS) -> bool:
    """True when the phrase's head word (or its singular) is a stop word."""
    head = head_word(phrase)
    return head in stop_words or (head.endswith("s") and head[:-1] in stop_words)


def filter_phrases(phrases: Sequence[str], stop_words: Iterable[str] = BACKGROUND_WORDS) -> list[str]:
    """Layer-prompt candidates: whitespace-normalised phrases minus background words, bare pronouns
    and case-insensitive repeats, in their original order."""
    stop = frozenset(w.lower() for w in stop_words)
    kept, seen = [], set()
    for phrase in phrases:
        phrase = " ".join(phrase.split()).strip(".,;:!?\"'")
        low = phrase.lower()
        if not phrase or low in seen or is_background_phrase(phrase, stop):
            continue
        if all(w in PRONOUNS for w in low.split()):
            continue
        seen.add(low)
        kept.append(phrase)
    return kept


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def dedupe_detections(detections: Sequence[Detection], iou_threshold: float) -> list[Detection]:
    """Greedy non-maximum suppression across phrases: highest score first, a box overlapping a kept
    one by IoU > `iou_threshold` is dropped. Returns the kept detections by decreasing score.

    Open-vocabulary detectors find one object for several phrases ("a dog", "a puppy"); the object
    keeps the phrase that scored best. Empty boxes are dropped.
    """
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: -d.score):
        x0, y0, x1, y1 = det.box
        if x1 <= x0 or y1 <= y0:
            continue
        if all(box_iou(det.box, k.box) <= iou_threshold for k in kept):
            kept.append(det)
    return kept


def saliency_overlap(masks: np.ndarray, salient: np.ndarray) -> np.ndarray:
    """Fraction of each mask's pixels that are salient: masks (N, H, W) bool, salient (H, W) bool -> (N,).

    An empty mask has overlap 0.
    """
    area = masks.sum(axis=(1, 2))
    inside = (masks & salient[None]).sum(axis=(1, 2))
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)


def keep_salient(masks: np.ndarray, salient: np.ndarray, min_overlap: float = 0.1) -> np.ndarray:
    """(N,) bool: the masks whose saliency overlap is strictly above `min_overlap` (paper: 10%)."""
    return saliency_overlap(masks, salient) > min_overlap


def mean_depths(masks: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Mean of `depth` (H, W) inside each mask (N, H, W) -> (N,); empty masks get -inf (front)."""
    area = masks.sum(axis=(1, 2))
    total = (masks * depth[None]).sum(axis=(1, 2))
    return np.where(area > 0, total / np.maximum(area, 1), -np.inf)


def depth_order(masks: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Indices of `masks` from deepest to shallowest by mean depth (larger = farther); ties keep order."""
    return np.argsort(-mean_depths(masks, depth), kind="stable")


def resolve_overlaps(masks: np.ndarray) -> np.ndarray:
    """masks (N, H, W) bool ordered deepest first -> the same masks with every shared pixel given to
    the shallowest layer claiming it (a nearer object occludes a farther one)."""
    out = masks.copy()
    claimed = np.zeros(masks.shape[1:], bool)
    for i in range(len(masks) - 1, -1, -1):
        out[i] &= ~claimed
        claimed |= masks[i]
    return out


def salient_fraction(salient: np.ndarray, region: np.ndarray) -> float:
    """Fraction of `region` (H, W) bool that is salient; 0 for an empty region."""
    area = int(region.sum())
    return float((salient & region).sum() / area) if area else 0.0


def inpainting_keeps_object(salient: np.ndarray, hole: np.ndarray, max_fraction: float) -> bool:
    """The rejection rule: the inpainted hole still holds an object when more than `max_fraction` of
    it is salient on the inpainted background."""
    return salient_fraction(salient, hole) > max_fraction
