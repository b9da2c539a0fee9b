"""The stage interfaces of data construction. Every stage takes a batch of `Frame`s and returns one
result per frame, in order, so that an implementation can run the batch through a model at once.

Conventions: images are (H, W, 3) uint8 RGB; masks and maps are (H, W) at the frame's size; boxes are
(x0, y0, x1, y1) in pixels; depth grows with distance (the deepest layer has the largest mean).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
    """One image in flight. `key` names the source image; ground-truth (oracle) stages look it up."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8


@dataclasses.dataclass(frozen=True)
class Detection:
    phrase: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float


class Captioner(Protocol):
    def caption(self, frames: Sequence[Frame]) -> list[str]: ...


class PhraseExtractor(Protocol):
    def extract(self, caption: str) -> list[str]:
        """Candidate object phrases of a caption, in the caption's order (filtering comes later)."""
        ...


class Detector(Protocol):
    def detect(self, frames: Sequence[Frame], phrases: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """Boxes for each frame's phrases; `Detection.phrase` is one of that frame's phrases."""
        ...


class Segmenter(Protocol):
    def segment(self, frames: Sequence[Frame], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """boxes[i] (N_i, 4) -> (N_i, H, W) bool masks, one per box."""
        ...


class SaliencyModel(Protocol):
    def saliency(self, frames: Sequence[Frame]) -> list[np.ndarray]:
        """(H, W) float maps in [0, 1]: how likely each pixel belongs to a salient object."""
        ...


class DepthEstimator(Protocol):
    def depth(self, frames: Sequence[Frame]) -> list[np.ndarray]:
        """(H, W) float maps, larger = farther (only the order of values matters)."""
        ...


class Inpainter(Protocol):
    def inpaint(
        self, frames: Sequence[Frame], holes: Sequence[np.ndarray], negative_prompts: Sequence[str]
    ) -> list[np.ndarray]:
        """Fills each (H, W) bool hole; returns (H, W, 3) uint8 images (pixels outside the hole are
        restored by the pipeline, so an implementation may alter them)."""
        ...


@dataclasses.dataclass
class Stages:
    """One implementation per stage; `run.construct` runs them."""

    captioner: Captioner
    phrases: PhraseExtractor
    detector: Detector
    segmenter: Segmenter
    saliency: SaliencyModel
    depth: DepthEstimator
    inpainter: Inpainter
