"""Turns the model sections of a `ConstructionConfig` into loaded `Stages`.

Kept out of `config` so that reading a YAML never needs torch, and `hf_models` (imported here only
when stages are built) can raise the shared errors without importing the config.
"""

from __future__ import annotations

import inspect
from typing import Any

from layerdiff_jax import TORCH_EXTRA
from layerdiff_jax.construction.classical import ShiftFillInpainter
from layerdiff_jax.construction.config import MODEL_STAGES, ConstructionConfig
from layerdiff_jax.construction.errors import ConstructionConfigError
from layerdiff_jax.construction.phrases import make_phrase_extractor
from layerdiff_jax.construction.stages import Stages

# Class names in `hf_models`, looked up once that module (and torch with it) is imported.
_STAGE_CLASSES = {
    "captioner": "HFCaptioner",
    "detector": "OwlDetector",
    "segmenter": "SamSegmenter",
    "saliency": "SegmentationSaliency",
    "depth": "HFDepthEstimator",
    "inpainter": "DiffusersInpainter",
}


def _stage_kwargs(source: str, stage: str, section: dict[str, Any], cls) -> dict[str, Any]:
    """The section's keys checked against `cls.__init__`'s keyword arguments."""
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "runtime")]
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConstructionConfigError(f"{source}: unknown key(s) {stage}.{unknown}; {cls.__name__} takes {allowed}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in section]
    if missing:
        raise ConstructionConfigError(f"{source}: {stage} needs {missing}")
    return dict(section)


def build_stages(config: ConstructionConfig) -> Stages:
    """Loads every model stage named in `config` (imports torch, transformers and diffusers)."""
    missing = [s for s in MODEL_STAGES if s not in config.models]
    if missing:
        raise ConstructionConfigError(f"{config.source}: no section for stage(s) {missing}")
    try:
        return _build_stages(config)
    except ImportError as e:  # torch, transformers or diffusers missing
        raise ConstructionConfigError(
            f"{config.source}: the model stages need PyTorch and diffusers ({e}), from {TORCH_EXTRA}"
        ) from None


def _build_stages(config: ConstructionConfig) -> Stages:
    from layerdiff_jax.construction import hf_models

    try:
        runtime = hf_models.resolve_runtime(config.device, config.dtype)
    except (ValueError, RuntimeError) as e:
        raise ConstructionConfigError(f"{config.source}: device/dtype: {e}") from None
    built = {}
    for stage in MODEL_STAGES:
        section = config.models[stage]
        if stage == "inpainter" and section.get("kind") == "classical":
            section = {k: v for k, v in section.items() if k != "kind"}
            built[stage] = ShiftFillInpainter(**_stage_kwargs(config.source, stage, section, ShiftFillInpainter))
            continue
        cls = getattr(hf_models, _STAGE_CLASSES[stage])
        kwargs = _stage_kwargs(config.source, stage, section, cls)
        if "seed" in inspect.signature(cls.__init__).parameters:
            kwargs.setdefault("seed", config.seed)
        built[stage] = cls(runtime=runtime, **kwargs)
    return Stages(phrases=make_phrase_extractor(config.phrases.get("spacy_model")), **built)
