"""The models YAML of data construction: run settings, the rules' thresholds, and one section per model
stage naming a local folder. Nothing downloads; a relative path is relative to the YAML file.

    device: auto            # auto (CUDA when torch sees one) | cpu | cuda | cuda:1
    dtype: auto             # auto (float16 on CUDA, else float32) | float32 | float16 | bfloat16
    batch_size: 8
    max_side: 1024          # larger images are downscaled first; null keeps every size
    seed: 0
    rules: {background_prompt: the background, min_saliency_overlap: 0.1, ...}   # see `Rules`
    phrases: {spacy_model: en_core_web_sm}   # optional: without it (or spaCy) the heuristic runs
    captioner: {path: models/instructblip, prompt: "A short image caption:", max_new_tokens: 40}
    detector:  {path: models/owlv2, threshold: 0.2}
    segmenter: {path: models/sam-vit-huge}
    saliency:  {path: models/segformer-saliency, salient_labels: [1]}
    depth:     {path: models/dpt-hybrid-midas, output: inverse_depth}
    inpainter: {path: models/sd-inpainting, steps: 50, guidance_scale: 7.5, resolution: 512}
               # or {kind: classical} for the weight-free ShiftFillInpainter

The keys each model section takes are the keyword arguments of its class in `hf_models`; `build.build_stages`
checks them and loads the models.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from layerdiff_jax.construction.errors import ConstructionConfigError
from layerdiff_jax.construction.rules import BACKGROUND_WORDS

MODEL_STAGES = ("captioner", "detector", "segmenter", "saliency", "depth", "inpainter")


@dataclasses.dataclass(frozen=True)
class Rules:
    background_prompt: str = "the background"  # layer prompt p_0
    extra_stop_words: tuple[str, ...] = ()  # added to `rules.BACKGROUND_WORDS`
    nms_iou: float = 0.5  # detections of different phrases overlapping more than this are one object
    max_foregrounds: int | None = 3  # most-confident objects kept (the paper's data has 1..3)
    min_mask_fraction: float = 0.001  # masks smaller than this fraction of the image are dropped
    saliency_threshold: float = 0.5  # saliency map -> salient pixels
    min_saliency_overlap: float = 0.1  # keep a mask when more than this fraction of it is salient
    max_salient_in_hole: float = 0.1  # reject a background when more than this fraction of the hole is salient

    def __post_init__(self):
        for name in (
            "nms_iou",
            "min_mask_fraction",
            "saliency_threshold",
            "min_saliency_overlap",
            "max_salient_in_hole",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConstructionConfigError(f"rules.{name} must be a number in [0, 1], got {value!r}")
        if self.max_foregrounds is not None and (not isinstance(self.max_foregrounds, int) or self.max_foregrounds < 1):
            raise ConstructionConfigError(
                f"rules.max_foregrounds must be a positive integer or null, got {self.max_foregrounds!r}"
            )
        if not isinstance(self.background_prompt, str):
            raise ConstructionConfigError(f"rules.background_prompt must be a string, got {self.background_prompt!r}")
        object.__setattr__(self, "extra_stop_words", tuple(str(w).lower() for w in self.extra_stop_words))

    @property
    def stop_words(self) -> frozenset[str]:
        return BACKGROUND_WORDS | frozenset(self.extra_stop_words)


@dataclasses.dataclass(frozen=True)
class ConstructionConfig:
    batch_size: int = 8
    max_side: int | None = 1024
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    rules: Rules = dataclasses.field(default_factory=Rules)
    phrases: dict[str, Any] = dataclasses.field(default_factory=dict)
    models: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # stage -> section
    source: str = "<defaults>"  # the YAML file, for messages

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConstructionConfigError(
                f"{self.source}: batch_size must be a positive integer, got {self.batch_size!r}"
            )
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 8):
            raise ConstructionConfigError(
                f"{self.source}: max_side must be an integer >= 8 or null, got {self.max_side!r}"
            )
        unknown = sorted(set(self.phrases) - {"spacy_model"})
        if unknown:
            raise ConstructionConfigError(f"{self.source}: unknown key(s) phrases.{unknown}; allowed: spacy_model")


_TOP_LEVEL = {f.name for f in dataclasses.fields(ConstructionConfig)} - {"models", "source"}


def load_config(path: str | os.PathLike | None) -> ConstructionConfig:
    """Reads a models YAML (None: every default, no model sections). Model paths become absolute."""
    if path is None:
        return ConstructionConfig()
    path = Path(path)
    if not path.is_file():
        raise ConstructionConfigError(f"{path}: models file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConstructionConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConstructionConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _TOP_LEVEL - set(MODEL_STAGES))
    if unknown:
        raise ConstructionConfigError(
            f"{path}: unknown key(s) {unknown}; allowed: {sorted(_TOP_LEVEL | set(MODEL_STAGES))}"
        )
    settings = {k: v for k, v in raw.items() if k in _TOP_LEVEL and k not in ("rules", "phrases")}
    for section in ("rules", "phrases", *MODEL_STAGES):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConstructionConfigError(f"{path}: {section} must be a mapping, got {raw[section]!r}")
    try:
        settings["rules"] = Rules(**(raw.get("rules") or {}))
    except TypeError as e:
        allowed = [f.name for f in dataclasses.fields(Rules)]
        raise ConstructionConfigError(f"{path}: bad rules section ({e}); allowed keys: {allowed}") from None
    except ConstructionConfigError as e:
        raise ConstructionConfigError(f"{path}: {e}") from None
    models = {}
    for stage in MODEL_STAGES:
        if raw.get(stage) is None:
            continue
        section = dict(raw[stage])
        if "path" in section:
            section["path"] = str((path.parent / Path(str(section["path"])).expanduser()).resolve())
        models[stage] = section
    return ConstructionConfig(**settings, phrases=dict(raw.get("phrases") or {}), models=models, source=str(path))
