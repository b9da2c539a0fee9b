"""Ground-truth stages, so that the rest of the pipeline can be scored on samples with known layers.

The input is a folder of exchange-format sample folders (e.g. `build_dataset.py export`); each
image is the sample's composite. Detection and segmentation are replaced by the truth, and so are
the other models, so the oracle mode runs without weights:

- caption: the sample's global prompt (phrase extraction and filtering still run on it);
- detection: each phrase equal to a layer prompt gets that layer's mask box (score 1);
- segmentation: the ground-truth mask whose box best matches each box prompt;
- saliency: pixels that differ from the ground-truth background by more than `tolerance` (a
  leftover object in an inpainted background is salient, a good fill is not);
- depth: background deepest, then the layers in their ground-truth order (deepest first);
- inpainting: `classical.ShiftFillInpainter`.

So the pipeline's own parts (phrase filtering, saliency overlap, depth ordering, cutting, the
rejection rule) decide the output, and it must come back equal to the truth.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from layerdiff_jax.construction.classical import ShiftFillInpainter
from layerdiff_jax.construction.phrases import make_phrase_extractor
from layerdiff_jax.construction.rules import box_iou
from layerdiff_jax.construction.stages import Detection, Frame, Stages
from layerdiff_jax.data.layers import LayeredSample, read_sample_folder

SALIENCY_TOLERANCE = 32  # max channel difference to the true background that still counts as background


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) enclosing the non-zero pixels of an (H, W) mask (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


class GroundTruth:
    """Sample folders by key, read on demand (a small cache keeps a batch's samples in memory)."""

    def __init__(self, folders: dict[str, Path], cache_size: int = 256):
        self.folders = folders
        self.sample = functools.lru_cache(maxsize=cache_size)(self._read)

    def _read(self, key: str) -> LayeredSample:
        return read_sample_folder(self.folders[key])


class OracleCaptioner:
    def __init__(self, truth: GroundTruth):
        self.truth = truth

    def caption(self, frames: Sequence[Frame]) -> list[str]:
        return [self.truth.sample(f.key).global_prompt for f in frames]


class OracleDetector:
    def __init__(self, truth: GroundTruth):
        self.truth = truth

    def detect(self, frames: Sequence[Frame], phrases: Sequence[Sequence[str]]) -> list[list[Detection]]:
        out = []
        for frame, frame_phrases in zip(frames, phrases):
            sample = self.truth.sample(frame.key)
            layer_of = {p.lower(): i for i, p in enumerate(sample.layer_prompts[1:])}
            out.append(
                [
                    Detection(p, mask_box(sample.masks[layer_of[p.lower()]]), 1.0)
                    for p in frame_phrases
                    if p.lower() in layer_of
                ]
            )
        return out


class OracleSegmenter:
    def __init__(self, truth: GroundTruth):
        self.truth = truth

    def segment(self, frames: Sequence[Frame], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for frame, frame_boxes in zip(frames, boxes):
            masks = self.truth.sample(frame.key).masks > 0
            truth_boxes = [mask_box(m) for m in masks]
            picks = [int(np.argmax([box_iou(tuple(b), t) for t in truth_boxes])) for b in frame_boxes]
            out.append(masks[picks] if picks else np.zeros((0, *masks.shape[1:]), bool))
        return out


class OracleSaliency:
    def __init__(self, truth: GroundTruth, tolerance: int = SALIENCY_TOLERANCE):
        self.truth = truth
        self.tolerance = tolerance

    def saliency(self, frames: Sequence[Frame]) -> list[np.ndarray]:
        out = []
        for f in frames:
            diff = np.abs(f.image.astype(np.int16) - self.truth.sample(f.key).background.astype(np.int16))
            out.append((diff.max(-1) > self.tolerance).astype(np.float32))
        return out


class OracleDepth:
    def __init__(self, truth: GroundTruth):
        self.truth = truth

    def depth(self, frames: Sequence[Frame]) -> list[np.ndarray]:
        out = []
        for f in frames:
            masks = self.truth.sample(f.key).masks > 0
            k = len(masks)
            depth = np.full(masks.shape[1:], k + 1, np.float32)
            for i, m in enumerate(masks):  # layer i (0-based, deepest first) sits at depth k - i
                depth[m] = k - i
            out.append(depth)
        return out


def oracle_stages(truth: GroundTruth, spacy_model: str | None = None) -> Stages:
    return Stages(
        captioner=OracleCaptioner(truth),
        phrases=make_phrase_extractor(spacy_model),
        detector=OracleDetector(truth),
        segmenter=OracleSegmenter(truth),
        saliency=OracleSaliency(truth),
        depth=OracleDepth(truth),
        inpainter=ShiftFillInpainter(),
    )
