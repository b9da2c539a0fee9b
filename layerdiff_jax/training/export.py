"""Writing the trained model as a LayerDiff model folder (what sampling loads).

The folder is the training SD folder's `vae/`, `text_encoder/` and `tokenizer/` (hard links where the file
system allows, else copies) plus `layerdiff/` (`convert/layerdiff.save_layerdiff`). It is written beside
its destination and renamed into place, so a folder at the destination is always complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from layerdiff_jax.convert.layerdiff import save_layerdiff
from layerdiff_jax.convert.pipeline import TOKENIZER_DIR
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.models.layerdiff import LayerDiffUNet

COPIED_COMPONENTS = ("vae", "text_encoder", TOKENIZER_DIR)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def gather_to_host(tree: Any) -> Any:
    """Global (possibly multi-process) arrays -> full numpy arrays on every process. Call on all processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def export_model(
    out_dir: str | os.PathLike, sd_path: str | os.PathLike, model: LayerDiffUNet, params: Any, scheduler: SchedulerConfig
) -> Path:
    """Writes `out_dir` (replacing an earlier export) from host params and the schedule they were trained with;
    returns it. Call on one process."""
    out_dir, sd_path = Path(out_dir), Path(sd_path)
    missing = [name for name in COPIED_COMPONENTS if not (sd_path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{sd_path} has no {', '.join(missing)}: cannot assemble a LayerDiff model folder")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in COPIED_COMPONENTS:
        shutil.copytree(sd_path / name, staging / name, copy_function=_link_or_copy)
    save_layerdiff(staging, model, params, scheduler)
    previous = out_dir.with_name(out_dir.name + ".previous")
    if out_dir.exists():
        shutil.rmtree(previous, ignore_errors=True)
        out_dir.rename(previous)
    staging.rename(out_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return out_dir
