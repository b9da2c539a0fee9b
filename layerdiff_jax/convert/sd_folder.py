"""A whole Stable Diffusion 1.x model: loading its three components, and writing them as a converted folder.

A converted folder (what `scripts/convert_weights.py` writes) mirrors a diffusers SD folder:

  unet/, vae/, text_encoder/    config.json (diffusers/transformers style) + flax_params.safetensors
  tokenizer/                    copied from the source, when it has one
  layerdiff_conversion.json     source, date, parameter counts and the files written; written last, so
                                its presence marks a finished conversion

`load_unet` / `load_vae` / `load_text_encoder` read each component folder directly, and `load_sd` reads
all three from a converted folder, a diffusers folder or an original single-file checkpoint.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from layerdiff_jax.convert import core
from layerdiff_jax.convert.clip_text import load_text_encoder
from layerdiff_jax.convert.core import COMPONENTS, count_params, log_loaded
from layerdiff_jax.convert.single_file import load_single_file
from layerdiff_jax.convert.unet import load_unet
from layerdiff_jax.convert.vae import load_vae
from layerdiff_jax.fileio import check_finished, output_folder_problem
from layerdiff_jax.models.clip_text import CLIPTextConfig
from layerdiff_jax.models.unet import UNetConfig
from layerdiff_jax.models.vae import VAEConfig

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
CONVERSION_RECORD = "layerdiff_conversion.json"
# Any one of these marks a folder as a saved Hugging Face tokenizer.
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json", "tokenizer_config.json")
# What a conversion that predates the record's file list wrote into tokenizer/.
_SAVED_TOKENIZER_FILES = (*_TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "added_tokens.json")

CONVERTED_ENTRIES = (*COMPONENTS, TOKENIZER_DIR, CONVERSION_RECORD)  # what save_converted writes (and replaces)
_FOLDER_LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder}
_CONFIG_CLASSES = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}

Components = dict[str, tuple[nn.Module, dict]]


def read_component_configs(folder: str | Path) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder"} -> config, read from a diffusers-style folder's `<component>/config.json`."""
    folder = Path(folder)
    return {name: core.read_config(folder / name, _CONFIG_CLASSES[name].from_diffusers_config) for name in COMPONENTS}


def load_sd(
    path: str | Path,
    *,
    config_dir: str | Path | None = None,
    dtype: Any = jnp.float32,
    attention_impl: str = "auto",
) -> Components:
    """{"unet", "vae", "text_encoder"} -> (module, params) from any of the three SD layouts.

    `path` is a diffusers-format SD folder, a folder written by `save_converted`, or an original (LDM)
    single-file SD-1.x checkpoint. For a single file the architectures are SD 1.5's unless `config_dir`
    names a diffusers-style folder whose `unet/`, `vae/`, `text_encoder/` config.json describe it.
    """
    path = Path(path)
    if path.is_file():
        configs = read_component_configs(config_dir) if config_dir is not None else {}
        return load_single_file(
            path,
            unet_config=configs.get("unet"),
            vae_config=configs.get("vae"),
            text_config=configs.get("text_encoder"),
            dtype=dtype,
            attention_impl=attention_impl,
        )
    if not path.is_dir():
        raise FileNotFoundError(f"no Stable Diffusion model at {path}: expected a folder or a single checkpoint file")
    if config_dir is not None:
        raise ValueError(f"config_dir is only for single-file checkpoints; {path} is a folder with its own configs")
    check_finished(path)  # a conversion that did not finish: its files may be cut short
    absent = [name for name in COMPONENTS if not (path / name).is_dir()]
    if absent:
        raise FileNotFoundError(f"{path} is not a Stable Diffusion folder: it has no {'/, '.join(absent)}/")
    loaded = {}
    for name in COMPONENTS:
        start = time.perf_counter()
        loaded[name] = _FOLDER_LOADERS[name](path / name, dtype=dtype, attention_impl=attention_impl)
        log_loaded(name, loaded[name][1], start)
    return loaded


def check_tokenizer_dir(folder: str | Path) -> Path:
    """`folder` if it holds a saved tokenizer; a clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    return folder


def save_converted(
    output_dir: str | Path,
    components: Mapping[str, tuple[nn.Module, Mapping]],
    *,
    source: str | Path,
    config_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes a converted folder (see the module docstring) and returns its conversion record.

    Each component's config.json is copied from `config_dir/<component>/` when that file exists (keeping
    fields our configs don't model, such as token ids), else written from the module's config. An existing
    non-empty `output_dir` is refused unless `overwrite`; then only the entries written here are replaced,
    and only when they hold nothing but what an earlier conversion wrote (see `check_output_dir`).
    """
    output_dir = Path(output_dir)
    if tokenizer_dir is not None:
        tokenizer_dir = check_tokenizer_dir(tokenizer_dir)
    check_output_dir(output_dir, inputs=[source, config_dir, tokenizer_dir], overwrite=overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in CONVERTED_ENTRIES:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    counts = {}
    for name in COMPONENTS:
        module, params = components[name]
        folder = output_dir / name
        folder.mkdir()
        source_config = Path(config_dir) / name / core.CONFIG_FILE if config_dir is not None else None
        if source_config is not None and source_config.is_file():
            shutil.copyfile(source_config, folder / core.CONFIG_FILE)
        else:
            (folder / core.CONFIG_FILE).write_text(json.dumps(module.config.to_diffusers_config(), indent=2) + "\n")
        core.save_flax_params(params, folder / core.FLAX_PARAMS_FILE)
        counts[name] = count_params(params)
        logger.info("wrote %s", folder)

    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, output_dir / TOKENIZER_DIR)
        logger.info("copied the tokenizer from %s", tokenizer_dir)
    else:
        logger.warning(
            "no tokenizer copied: sampling needs one; put an SD-1.5 tokenizer/ folder (vocab.json, merges.txt) in %s",
            output_dir,
        )
    record = {
        "source": str(Path(source).resolve()),
        "source_format": "single_file" if Path(source).is_file() else "diffusers_folder",
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": {**counts, "total": sum(counts.values())},
        "tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir is not None else None,
        "files": sorted(_relative_files(output_dir)),
    }
    (output_dir / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _relative_files(output_dir: Path) -> set[str]:
    """The files under the entries a conversion writes, as paths relative to `output_dir`."""
    found = set()
    for name in CONVERTED_ENTRIES:
        entry = output_dir / name
        files = entry.rglob("*") if entry.is_dir() else [entry] if entry.exists() else []
        found.update(p.relative_to(output_dir).as_posix() for p in files if not p.is_dir())
    return found


def _converter_files(output_dir: Path) -> set[str]:
    """What an earlier conversion wrote into `output_dir`: its record's list, else what a conversion writes."""
    record = output_dir / CONVERSION_RECORD
    try:
        return set(json.loads(record.read_text())["files"]) | {CONVERSION_RECORD}
    except (OSError, ValueError, KeyError, TypeError):  # no record, or one from before the file list
        own = {f"{c}/{name}" for c in COMPONENTS for name in (core.CONFIG_FILE, core.FLAX_PARAMS_FILE)}
        return own | {f"{TOKENIZER_DIR}/{name}" for name in _SAVED_TOKENIZER_FILES} | {CONVERSION_RECORD}


def check_output_dir(output_dir: str | Path, *, inputs: list[str | Path | None], overwrite: bool) -> None:
    """Raises unless `save_converted` may write to `output_dir`: it must be absent or empty unless `overwrite`,
    and then the entries it replaces must hold only files an earlier conversion wrote (nothing a user put
    there is deleted); writing must not replace any of `inputs` (e.g. the output folder being the source
    folder), nor go inside an input folder."""
    output_dir = Path(output_dir)
    problem = output_folder_problem(output_dir, overwrite=True)
    if problem:
        raise FileExistsError(f"output {problem}")
    out = output_dir.resolve()
    replaced = [out / name for name in CONVERTED_ENTRIES]
    for path in [Path(p).resolve() for p in inputs if p is not None]:
        if path == out or any(path == r or r in path.parents for r in replaced):
            raise ValueError(f"writing to {output_dir} would overwrite the input {path}; choose another output folder")
        if path.is_dir() and path in out.parents:
            raise ValueError(f"output {output_dir} is inside the input folder {path}; choose a folder outside it")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {output_dir} exists and is not empty "
                "(overwrite, or the script's --overwrite, replaces the converted entries in it)"
            )
        foreign = sorted(_relative_files(output_dir) - _converter_files(output_dir))
        if foreign:
            shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise FileExistsError(
                f"output folder {output_dir}: overwriting would delete files a conversion did not write: {shown}; "
                "move them out first, or choose another output folder"
            )
