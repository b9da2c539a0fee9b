"""Model folders for the converters' tests (VAE, CLIP text encoder): torch models whose vectors are not their
initial 0s and 1s, copies of a folder with other weights, and the checks every loader passes."""

import re
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from layerdiff_jax.convert import core


def perturb_vectors(model: torch.nn.Module, seed: int) -> None:
    """Perturbs biases and norm scales (torch initialises norms to exactly 1 and 0) so that they are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def copy_with_weights(folder: Path, out: Path, weights_file: str, weights: dict[str, np.ndarray]) -> None:
    """A copy of the model folder `folder` in `out`: its config.json, and `weights` as `weights_file`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / weights_file)
    (out / "config.json").write_text((folder / "config.json").read_text())


def assert_corruption_is_named(folder: Path, out: Path, weights_file: str, load: Callable, key: str,
                               flax_path: str, corruption: str) -> None:
    """`load` on a copy of `folder` with one corruption of tensor `key` raises a ConversionError that names it:
    "missing" (deleted: named by its Flax path), "extra" (a tensor no parameter takes) or "shape" (a row short)."""
    weights = load_file(folder / weights_file)
    if corruption == "missing":
        del weights[key]
        key = flax_path
    elif corruption == "extra":
        key = key.replace(".weight", "_extra.weight")
        weights[key] = np.zeros((3, 3), np.float32)
    else:
        weights[key] = weights[key][:-1]
    copy_with_weights(folder, out, weights_file, weights)
    with pytest.raises(core.ConversionError, match=re.escape(key)):
        load(out)


def assert_bin_and_flax_params_load(model: torch.nn.Module, folder: Path, params, load: Callable, bin_file: str,
                                    out: Path) -> None:
    """`model` saved as a torch .bin (`bin_file`) and `params` as converted Flax params both load as `params`."""
    bin_dir, flax_dir = out / "bin", out / "flax"
    for d in (bin_dir, flax_dir):
        d.mkdir()
        (d / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / bin_file)
    core.save_flax_params(params, flax_dir / core.FLAX_PARAMS_FILE)
    for d in (bin_dir, flax_dir):
        _, reloaded = load(d)
        jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)
