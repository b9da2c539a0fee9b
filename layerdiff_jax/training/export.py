"""Writing the trained model as a LayerDiff model folder (what sampling loads), or, after text-to-image
pretraining, as an SD folder (what LayerDiff training starts from).

A LayerDiff model folder is the training SD folder's `vae/`, `text_encoder/` and `tokenizer/` (hard links where the file
system allows, else copies) plus `layerdiff/` (`convert/model_folder.save_layerdiff`), and `sampling.json` when
training records the sampling settings it validated (`log.record_sample_settings`). It is written beside
its destination and renamed into place (`fileio.staged_folder`), so a folder at the destination is always
complete; its UNet config records the training resolution (`sample_size`, in latent pixels), which sampling
and editing take as their default size. An SD folder is the layout `convert_weights.py` writes (`vae/`,
`text_encoder/`, `unet/`, `tokenizer/`) plus `scheduler/`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from layerdiff_jax.convert.model_folder import SamplingSettings, save_layerdiff, save_sampling_settings, save_scheduler_config
from layerdiff_jax.convert.sd_folder import TOKENIZER_DIR, save_converted
from layerdiff_jax.convert.vae import load_vae
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.fileio import staged_folder
from layerdiff_jax.models.clip_text import CLIPTextTransformer
from layerdiff_jax.models.layerdiff import LayerDiffUNet
from layerdiff_jax.models.text_to_image import TextToImageModel
from layerdiff_jax.models.unet import UNet2DConditionModel

COPIED_COMPONENTS = ("vae", "text_encoder", TOKENIZER_DIR)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_with(out_dir: Path, write) -> Path:
    """Runs `write(staging)` on a fresh folder beside `out_dir`, then renames it into place."""
    with staged_folder(out_dir) as staging:
        write(staging)
    return out_dir


def _check_components(sd_path: Path, names, what: str) -> None:
    missing = [name for name in names if not (sd_path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{sd_path} has no {', '.join(missing)}: cannot assemble {what}")


def recorded_sampling(config: Any) -> SamplingSettings | None:
    """The sampling settings a training config says to record in its model folder (`log.record_sample_settings`)."""
    return SamplingSettings(config.log.sample_steps, config.log.sample_guidance) if config.log.record_sample_settings else None


def export_model(
    out_dir: str | os.PathLike,
    sd_path: str | os.PathLike,
    model: LayerDiffUNet,
    params: Any,
    scheduler: SchedulerConfig,
    sample_size: int | None = None,
    sampling: SamplingSettings | None = None,
) -> Path:
    """Writes `out_dir` (replacing an earlier export) from host params and the schedule they were trained with;
    returns it. `sample_size` is the training resolution in latent pixels (image side / VAE factor); `sampling`
    the steps and guidance to record as the model's sampling defaults. Call on one process."""
    sd_path = Path(sd_path)
    _check_components(sd_path, COPIED_COMPONENTS, "a LayerDiff model folder")
    if sample_size is not None:
        model = model.clone(unet_config=dataclasses.replace(model.unet_config, sample_size=sample_size))

    def write(staging: Path) -> None:
        for name in COPIED_COMPONENTS:
            shutil.copytree(sd_path / name, staging / name, copy_function=_link_or_copy)
        save_layerdiff(staging, model, params, scheduler)
        if sampling is not None:
            save_sampling_settings(staging, sampling)

    return _replace_with(Path(out_dir), write)


def export_text_to_image(
    out_dir: str | os.PathLike, sd_path: str | os.PathLike, model: TextToImageModel, params: Any, scheduler: SchedulerConfig
) -> Path:
    """Writes `out_dir` as an SD folder: the trained text encoder and UNet (`params`), `sd_path`'s VAE and
    tokenizer, and the schedule they were trained with. Call on one process."""
    sd_path = Path(sd_path)
    _check_components(sd_path, ("vae", TOKENIZER_DIR), "an SD folder")
    vae = load_vae(sd_path / "vae")
    components = {
        "unet": (UNet2DConditionModel(model.unet_config), params["unet"]),
        "vae": vae,
        "text_encoder": (CLIPTextTransformer(model.text_config), params["text_encoder"]),
    }

    def write(staging: Path) -> None:
        save_converted(staging, components, source=sd_path, tokenizer_dir=sd_path / TOKENIZER_DIR, overwrite=True)
        save_scheduler_config(staging, scheduler)

    return _replace_with(Path(out_dir), write)
