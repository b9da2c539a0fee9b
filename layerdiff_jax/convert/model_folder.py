"""Saving and loading a trained LayerDiff UNet as a component folder.

A LayerDiff model folder is an SD folder (`vae/`, `text_encoder/`, `tokenizer/`, as written by
`convert/sd_folder.save_converted`) plus `layerdiff/`: `config.json` ({"unet": diffusers-style UNet config,
"layerdiff": LayerDiffConfig fields}) and `flax_params.safetensors`, and `scheduler/scheduler_config.json`
(the schedule and prediction type it was trained with, as a diffusers DDIMScheduler config; a folder
without one was trained as SD 1.5 is), and optionally `sampling.json` ({"steps": 25, "guidance": 1.0}: the DDIM
steps and guidance scale its training validated, which sampling and editing then default to instead of the
paper's). Training exports this; sampling reads it.

The params file's header records the `max_layers` the weights were trained for: the layer blocks and
the prompt enhancer only ever saw that many layers, so a config raised above it is warned about.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp

from layerdiff_jax.convert import core
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.diffusion.settings import DEFAULT_GUIDANCE, DEFAULT_STEPS, check_sampling_settings
from layerdiff_jax.models.config_types import check_field_types
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet
from layerdiff_jax.models.unet import UNetConfig

log = logging.getLogger(__name__)

LAYERDIFF_DIR = "layerdiff"
TRAINED_MAX_LAYERS = "max_layers"  # key in the params file's header
SCHEDULER_DIR, SCHEDULER_FILE = "scheduler", "scheduler_config.json"  # diffusers' names
SAMPLING_FILE = "sampling.json"
PAPER_SETTINGS = "the paper's default"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The DDIM steps and guidance scale sampling and editing default to, and where they come from."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    source: str = PAPER_SETTINGS

    def choose(self, steps: int | None = None, guidance: float | None = None) -> tuple[int, float, str]:
        """(steps, guidance): each the given value, else this default; and a line saying which and from where."""
        steps_from, guidance_from = (self.source if given is None else "given" for given in (steps, guidance))
        steps = self.steps if steps is None else steps
        guidance = self.guidance if guidance is None else guidance
        return steps, guidance, f"sampling settings: {steps} DDIM steps ({steps_from}), guidance {guidance:g} ({guidance_from})"


def layerdiff_config_dict(model: LayerDiffUNet) -> dict[str, Any]:
    return {"unet": model.unet_config.to_diffusers_config(), "layerdiff": dataclasses.asdict(model.config)}


def save_layerdiff(folder: str | Path, model: LayerDiffUNet, params: Mapping, scheduler: SchedulerConfig = SchedulerConfig()) -> Path:
    """Writes `folder/layerdiff/` (config + params) and `folder/scheduler/`; returns the `layerdiff/` folder."""
    out = Path(folder) / LAYERDIFF_DIR
    out.mkdir(parents=True, exist_ok=True)
    core.save_flax_params(params, out / core.FLAX_PARAMS_FILE, {TRAINED_MAX_LAYERS: str(model.config.max_layers)})
    (out / core.CONFIG_FILE).write_text(json.dumps(layerdiff_config_dict(model), indent=2) + "\n")
    save_scheduler_config(folder, scheduler)
    return out


def save_scheduler_config(folder: str | Path, scheduler: SchedulerConfig) -> None:
    """Writes `folder/scheduler/scheduler_config.json` (a diffusers DDIMScheduler config)."""
    scheduler_dir = Path(folder) / SCHEDULER_DIR
    scheduler_dir.mkdir(exist_ok=True)
    (scheduler_dir / SCHEDULER_FILE).write_text(json.dumps(scheduler.to_diffusers_config(), indent=2) + "\n")


def load_scheduler_config(folder: str | Path) -> SchedulerConfig:
    """The `SchedulerConfig` of a LayerDiff model or SD folder; SD 1.5's when it has no `scheduler/`."""
    path = Path(folder) / SCHEDULER_DIR / SCHEDULER_FILE
    if not path.is_file():
        return SchedulerConfig()
    try:
        return SchedulerConfig.from_diffusers_config(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def save_sampling_settings(folder: str | Path, settings: SamplingSettings) -> None:
    """Writes `folder/sampling.json`: the steps and guidance sampling should default to for this model."""
    check_sampling_settings(steps=settings.steps, guidance=settings.guidance)
    record = {"steps": settings.steps, "guidance": float(settings.guidance)}
    (Path(folder) / SAMPLING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_sampling_settings(folder: str | Path, num_train_timesteps: int | None = None) -> SamplingSettings:
    """The settings `folder/sampling.json` records, else the paper's; a broken file is a ValueError naming it."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return SamplingSettings()
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or set(record) != {"steps", "guidance"}:
            raise ValueError(f'expected {{"steps": int, "guidance": number}}, got {record!r}')
        check_sampling_settings(steps=record["steps"], guidance=record["guidance"], num_train_timesteps=num_train_timesteps)
    except ValueError as e:  # json.JSONDecodeError and RequestError are ValueErrors
        raise ValueError(f"{path}: {e}") from None
    return SamplingSettings(record["steps"], float(record["guidance"]), f"recorded in {path}")


def build_layerdiff(config: Mapping[str, Any], **module_kwargs) -> LayerDiffUNet:
    """The module described by a `layerdiff/config.json` dict; unknown LayerDiff fields are an error."""
    fields = {f.name for f in dataclasses.fields(LayerDiffConfig)}
    unknown = sorted(set(config.get("layerdiff", {})) - fields)
    if unknown:
        raise ValueError(f"unknown LayerDiff config field(s): {', '.join(unknown)}")
    check_field_types(LayerDiffConfig, config.get("layerdiff", {}))
    return LayerDiffUNet(
        UNetConfig.from_diffusers_config(config["unet"]), LayerDiffConfig(**config.get("layerdiff", {})), **module_kwargs
    )


def load_layerdiff(
    folder: str | Path, *, dtype=jnp.float32, attention_impl: str = "auto", remat: bool = False
) -> tuple[LayerDiffUNet, dict]:
    """(module, float32 numpy params) from a LayerDiff model folder (or its `layerdiff/` subfolder)."""
    folder = Path(folder)
    component = folder / LAYERDIFF_DIR if (folder / LAYERDIFF_DIR).is_dir() else folder
    model = core.read_config(component, functools.partial(build_layerdiff, dtype=dtype, attention_impl=attention_impl, remat=remat))
    target = abstract_params(model, *model.example_inputs())
    params = core.load_flax_params(component / core.FLAX_PARAMS_FILE, target)
    trained = core.read_params_metadata(component / core.FLAX_PARAMS_FILE).get(TRAINED_MAX_LAYERS)
    if trained is not None and model.config.max_layers > int(trained):
        log.warning(
            "%s: max_layers=%d, but the weights were trained with max_layers=%s: more layers than that are untrained "
            "territory for the layer blocks and the prompt enhancer", component / core.CONFIG_FILE, model.config.max_layers, trained,
        )
    return model, params
