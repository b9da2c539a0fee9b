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

The keys each model section takes are the keyword arguments of its class in `hf_models`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

import yaml

from layerdiff_jax.construction.phrases import make_phrase_extractor
from layerdiff_jax.construction.rules import BACKGROUND_WORDS
from layerdiff_jax.construction.stages import Stages

MODEL_STAGES = ("captioner", "detector", "segmenter", "saliency", "depth", "inpainter")
_STAGE_CLASSES = {
    "captioner": "HFCaptioner",
    "detector": "OwlDetector",
    "segmenter": "SamSegmenter",
    "saliency": "SegmentationSaliency",
    "depth": "HFDepthEstimator",
    "inpainter": "DiffusersInpainter",
}


class ConfigError(ValueError):
    """A bad models YAML; the message names the file and the key."""


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
                raise ConfigError(f"rules.{name} must be a number in [0, 1], got {value!r}")
        if self.max_foregrounds is not None and (not isinstance(self.max_foregrounds, int) or self.max_foregrounds < 1):
            raise ConfigError(f"rules.max_foregrounds must be a positive integer or null, got {self.max_foregrounds!r}")
        if not isinstance(self.background_prompt, str):
            raise ConfigError(f"rules.background_prompt must be a string, got {self.background_prompt!r}")
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
            raise ConfigError(f"{self.source}: batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 8):
            raise ConfigError(f"{self.source}: max_side must be an integer >= 8 or null, got {self.max_side!r}")
        unknown = sorted(set(self.phrases) - {"spacy_model"})
        if unknown:
            raise ConfigError(f"{self.source}: unknown key(s) phrases.{unknown}; allowed: spacy_model")


_TOP_LEVEL = {f.name for f in dataclasses.fields(ConstructionConfig)} - {"models", "source"}


def load_config(path: str | os.PathLike | None) -> ConstructionConfig:
    """Reads a models YAML (None: every default, no model sections). Model paths become absolute."""
    if path is None:
        return ConstructionConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: models file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _TOP_LEVEL - set(MODEL_STAGES))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_TOP_LEVEL | set(MODEL_STAGES))}")
    settings = {k: v for k, v in raw.items() if k in _TOP_LEVEL and k not in ("rules", "phrases")}
    for section in ("rules", "phrases", *MODEL_STAGES):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: {section} must be a mapping, got {raw[section]!r}")
    try:
        settings["rules"] = Rules(**(raw.get("rules") or {}))
    except TypeError as e:
        allowed = [f.name for f in dataclasses.fields(Rules)]
        raise ConfigError(f"{path}: bad rules section ({e}); allowed keys: {allowed}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    models = {}
    for stage in MODEL_STAGES:
        if raw.get(stage) is None:
            continue
        section = dict(raw[stage])
        if "path" in section:
            section["path"] = str((path.parent / Path(str(section["path"])).expanduser()).resolve())
        models[stage] = section
    return ConstructionConfig(**settings, phrases=dict(raw.get("phrases") or {}), models=models, source=str(path))


def _stage_kwargs(source: str, stage: str, section: dict[str, Any], cls) -> dict[str, Any]:
    """The section's keys checked against `cls.__init__`'s keyword arguments."""
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "runtime")]
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {stage}.{unknown}; {cls.__name__} takes {allowed}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in section]
    if missing:
        raise ConfigError(f"{source}: {stage} needs {missing}")
    return dict(section)


def build_stages(config: ConstructionConfig) -> Stages:
    """Loads every model stage named in `config` (imports torch, transformers and diffusers)."""
    missing = [s for s in MODEL_STAGES if s not in config.models]
    if missing:
        raise ConfigError(f"{config.source}: no section for stage(s) {missing}")
    from layerdiff_jax.construction import classical, hf_models

    try:
        runtime = hf_models.resolve_runtime(config.device, config.dtype)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{config.source}: device/dtype: {e}") from None
    built = {}
    for stage in MODEL_STAGES:
        section = config.models[stage]
        if stage == "inpainter" and section.get("kind") == "classical":
            section = {k: v for k, v in section.items() if k != "kind"}
            built[stage] = classical.ShiftFillInpainter(
                **_stage_kwargs(config.source, stage, section, classical.ShiftFillInpainter)
            )
            continue
        cls = getattr(hf_models, _STAGE_CLASSES[stage])
        kwargs = _stage_kwargs(config.source, stage, section, cls)
        if "seed" in inspect.signature(cls.__init__).parameters:
            kwargs.setdefault("seed", config.seed)
        built[stage] = cls(runtime=runtime, **kwargs)
    return Stages(phrases=make_phrase_extractor(config.phrases.get("spacy_model")), **built)
