"""PyTorch state dict -> Flax parameter tree, strictly.

Model-specific code supplies only a `rename` from a torch key to a torch-style module path in our
naming (e.g. "down_blocks.0.attentions.1.proj_in.weight"). Everything else is generic and driven by the
target parameter tree: "a.0.b.weight" becomes ("a_0", "b", <leaf>), where the leaf and the layout
transform are read off the Flax tree (Dense kernel: transpose; Conv kernel: OIHW -> HWIO; norm weight:
scale; embedding weight: embedding). Every source key is used exactly once and every parameter is filled
exactly once; anything else is a `ConversionError` listing the offending names.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np

from layerdiff_jax import TORCH_EXTRA

logger = logging.getLogger(__name__)

# File names, in order of preference, that hold a component's PyTorch weights.
TORCH_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
COMPONENTS = ("unet", "vae", "text_encoder")  # an SD folder's model components
FLAX_PARAMS_FILE = "flax_params.safetensors"  # what scripts/convert_weights.py writes
CONFIG_FILE = "config.json"


class ConversionError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def _list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def raise_on_mismatch(source: str, *, missing=(), unexpected=(), mismatched=(), duplicates=()) -> None:
    """A ConversionError listing every missing, unexpected, mis-shaped or duplicated name, if there is any."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} parameter(s): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} key(s): {_list(mismatched)}")
    if duplicates:
        problems.append(f"key(s) mapping onto an already-filled parameter: {_list(duplicates)}")
    if problems:
        raise ConversionError(f"{source} does not match the model:\n  " + "\n  ".join(problems))


def load_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file without torch, or a pickle with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own types for truncated/corrupt headers
            raise ConversionError(f"cannot read {path}: {e}") from e
    try:
        import torch  # only needed for pickled checkpoints
    except ImportError:
        raise ConversionError(f"{path} is a pickled PyTorch checkpoint: reading it needs PyTorch, from {TORCH_EXTRA}") from None

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"cannot read {path} as a weights-only torch pickle: {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # LDM/CompVis .ckpt files nest the weights
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_config(folder: str | Path, parse: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """A component folder's config.json as a dict, or `parse(dict)`; a file that does not parse, or a field
    `parse` refuses, raises ConversionError naming the file."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: expected a diffusers/transformers component folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got {type(config).__name__}")
        return config if parse is None else parse(config)
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise ConversionError(f"{path}: {e}") from None


def read_torch_weights(folder: str | Path) -> dict[str, np.ndarray]:
    folder = Path(folder)
    for name in TORCH_WEIGHT_FILES:
        if (folder / name).is_file():
            return load_torch_file(folder / name)
    raise FileNotFoundError(f"{folder} holds none of {', '.join(TORCH_WEIGHT_FILES)} or {FLAX_PARAMS_FILE}")


def _module_path(torch_path: str) -> tuple[str, ...]:
    """'down_blocks.0.attentions.1.proj_in' -> ('down_blocks_0', 'attentions_1', 'proj_in')."""
    parts: list[str] = []
    for part in torch_path.split("."):
        if re.fullmatch(r"\d+", part) and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def _to_flax_layout(value: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if len(target_shape) == 4:  # Conv: OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
        else:  # Dense: (out, in) -> (in, out); a 1x1 conv weight (out, in, 1, 1) maps onto a Dense too
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
            value = value.T if value.ndim == 2 else value
    return value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping,
    rename: Callable[[str], str | None] = lambda k: k,
    *,
    source: str = "checkpoint",
) -> dict:
    """Maps a torch state dict onto `target` (a tree of arrays/ShapeDtypeStructs) and returns float32 params.

    `rename(key)` returns the torch-style path in our naming, or None for a key that is deliberately
    unused (non-parameter buffers such as CLIP's position_ids). The result has exactly target's structure.
    """
    flat_target = flax.traverse_util.flatten_dict(dict(target))
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, duplicates = [], [], []
    for key, value in state_dict.items():
        new_key = rename(key)
        if new_key is None:
            continue
        module_path, _, torch_leaf = new_key.rpartition(".")
        path = _module_path(module_path)
        if torch_leaf == "bias":
            candidates = ["bias"]
        elif torch_leaf == "weight":
            candidates = ["kernel", "scale", "embedding"]
        else:
            candidates = [torch_leaf]
        leaf = next((c for c in candidates if path + (c,) in flat_target), None)
        if leaf is None:
            unexpected.append(key)
            continue
        full = path + (leaf,)
        target_shape = tuple(flat_target[full].shape)
        array = _to_flax_layout(np.asarray(value), leaf, target_shape)
        if tuple(array.shape) != target_shape:
            mismatched.append(f"{key} {tuple(np.shape(value))} -> {'/'.join(full)} expects {target_shape}")
            continue
        if full in filled:
            duplicates.append(key)
            continue
        filled[full] = array.astype(np.float32)
    missing = ["/".join(p) for p in flat_target if p not in filled]
    raise_on_mismatch(source, missing=missing, unexpected=unexpected, mismatched=mismatched, duplicates=duplicates)
    return flax.traverse_util.unflatten_dict(filled)


def save_flax_params(params: Mapping, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """float32 arrays keyed by their Flax path; `metadata` goes into the safetensors header."""
    from safetensors.numpy import save_file

    flat = flax.traverse_util.flatten_dict(dict(nn.meta.unbox(params)), sep="/")
    save_file({k: np.array(v, dtype=np.float32, order="C") for k, v in flat.items()}, str(path), metadata=dict(metadata or {}))


def read_params_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata `save_flax_params` wrote ({} for none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def load_flax_params(path: str | Path, target: Mapping) -> dict:
    """Reads params written by `save_flax_params`, checked key by key and shape by shape against `target`."""
    flat = load_torch_file(path)  # a safetensors file of float32 arrays keyed "a/b/kernel"
    flat_target = flax.traverse_util.flatten_dict(dict(target), sep="/")
    missing = sorted(set(flat_target) - set(flat))
    unexpected = sorted(set(flat) - set(flat_target))
    mismatched = [
        f"{k} {tuple(flat[k].shape)} expects {tuple(flat_target[k].shape)}"
        for k in sorted(set(flat) & set(flat_target))
        if tuple(flat[k].shape) != tuple(flat_target[k].shape)
    ]
    raise_on_mismatch(str(path), missing=missing, unexpected=unexpected, mismatched=mismatched)
    return flax.traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()}, sep="/")


def load_params(folder: str | Path, target: Mapping, rename: Callable[[str], str | None]) -> dict:
    """A component folder's params: our converted `flax_params.safetensors` if present, else its torch weights."""
    folder = Path(folder)
    if (folder / FLAX_PARAMS_FILE).is_file():
        return load_flax_params(folder / FLAX_PARAMS_FILE, target)
    return convert_state_dict(read_torch_weights(folder), target, rename, source=str(folder))


def log_loaded(name: str, params: Mapping, start: float) -> None:
    """A progress line: the component, its parameter count, and the seconds since `start`."""
    logger.info("%s: %s parameters (%.1f s)", name, f"{count_params(params):,}", time.perf_counter() - start)


def count_params(params: Mapping) -> int:
    """The number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(params)))
