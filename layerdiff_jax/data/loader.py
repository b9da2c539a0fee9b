"""The grain data loader: built layered data -> per-host batches of padded numpy arrays.

Each batch (per host, `B = batch_size`, `L = max_layers`) is a dict ready for
`jax.make_array_from_process_local_data`:

    images       float32 (B, L, H, W, 3) in [-1, 1]; layer 0 = background, then foregrounds deepest first
    masks        float32 (B, L, H, W, 1) in [0, 1]; layer 0 = 1 - sum of the foreground masks
    layer_valid  bool    (B, L)
    global_ids   int32   (B, T)       T = tokenizer.max_length (77)
    layer_ids    int32   (B, L, T)

Padded layers are zero images and masks with the empty prompt's ids. With `with_keys=True` a batch also holds

    record_key   int64   (B,)         each sample's record in the data source, for caches keyed by record

For pretraining a plain text-to-image model (the toy base), `flat_views` turns each layered record into one
flat image with its prompt, never showing a mask or a layer (`ToFlatImage`):

    images       float32 (B, H, W, 3) in [-1, 1]
    ids          int32   (B, T)

The iterator of the returned
`grain.DataLoader` is checkpointable (`get_state()` / `set_state()`, or orbax's grain handlers), and a
restored iterator continues the same stream.
"""

from __future__ import annotations

import os
from typing import Any

import grain.python as grain
import jax
import numpy as np
from absl import flags

from layerdiff_jax.data.layers import DataError, LayeredSample, background_mask
from layerdiff_jax.data.synthetic import PALETTE, background_prompt, global_prompt, parse_foreground_prompt
from layerdiff_jax.data.tfds_builders import open_data_source, record_to_sample
from layerdiff_jax.data.tokenizer import PromptTokenizer

FLAT_VIEWS = ("composite", "background", "object")
RECORD_KEY = "record_key"


class KeyedSource(grain.RandomAccessDataSource):
    """A data source whose records also carry their own key (`RECORD_KEY`)."""

    def __init__(self, source: grain.RandomAccessDataSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> dict[str, Any]:
        return {**self.source[key], RECORD_KEY: key}

    def __repr__(self) -> str:  # grain checks a checkpoint's data position against the source's repr on resume
        return f"KeyedSource({self.source!r})"


class ToLayerArrays(grain.MapTransform):
    """A decoded record -> the padded per-sample arrays of a batch (see the module docstring)."""

    def __init__(self, tokenizer: PromptTokenizer, max_layers: int):
        self.tokenizer = tokenizer
        self.max_layers = max_layers

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        sample = record_to_sample(record)
        n, L = sample.num_layers, self.max_layers
        if n > L:
            raise ValueError(
                f"sample with {n} layers ({sample.global_prompt!r}) exceeds max_layers={L}; raise max_layers"
            )
        h, w = sample.size
        fg_masks = sample.masks[..., None].astype(np.float32) / 255.0
        images = np.zeros((L, h, w, 3), np.float32)
        masks = np.zeros((L, h, w, 1), np.float32)
        images[0] = sample.background
        images[1:n] = sample.foregrounds
        images[:n] = images[:n] / 127.5 - 1.0
        masks[0] = background_mask(fg_masks)
        masks[1:n] = fg_masks
        ids = self.tokenizer([sample.global_prompt, *sample.layer_prompts, *[""] * (L - n)])
        arrays = {
            "images": images,
            "masks": masks,
            "layer_valid": np.arange(L) < n,
            "global_ids": ids[0],
            "layer_ids": ids[1:],
        }
        if RECORD_KEY in record:
            arrays[RECORD_KEY] = np.int64(record[RECORD_KEY])
        return arrays


def parse_flat_views(text: str) -> dict[str, float]:
    """'composite:0.5,background:0.2,object:0.3' -> {view: probability} (normalised)."""
    views = {}
    for part in text.split(","):
        name, _, weight = part.partition(":")
        try:
            views[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"flat views {text!r}: expected 'view:weight,...' with views from {FLAT_VIEWS}") from None
    unknown = sorted(set(views) - set(FLAT_VIEWS))
    if unknown or any(w < 0 for w in views.values()) or sum(views.values()) <= 0:
        raise ValueError(f"flat views {text!r}: views must come from {FLAT_VIEWS}, with weights >= 0 summing > 0")
    total = sum(views.values())
    return {name: w / total for name, w in views.items()}


def single_object_view(sample: LayeredSample, layer: int, background_colour: str) -> tuple[np.ndarray, str]:
    """Foreground `layer` (1-based) alone on a plain background of a palette colour, and its prompt
    ('a red circle on a blue background'). The layer prompt must be of the synthetic vocabulary."""
    if parse_foreground_prompt(sample.layer_prompts[layer]) is None:
        raise DataError(
            f"single-object views need foreground prompts of the synthetic vocabulary ('a red circle'), "
            f"got {sample.layer_prompts[layer]!r}"
        )
    mask = sample.masks[layer - 1][..., None].astype(np.float32) / 255.0
    plain = np.asarray(PALETTE[background_colour], np.float32)
    image = mask * sample.foregrounds[layer - 1] + (1.0 - mask) * plain
    prompt = global_prompt([sample.layer_prompts[layer]], background_prompt(background_colour, "plain"))
    return np.round(image).astype(np.uint8), prompt


class ToFlatImage(grain.RandomMapTransform):
    """A decoded record -> one flat image and its prompt: the composite with the global prompt, the background
    with its prompt, or one foreground alone on a plain background of another palette colour with its prompt,
    drawn with the `views` probabilities (see the module docstring)."""

    def __init__(self, tokenizer: PromptTokenizer, views: dict[str, float]):
        self.tokenizer = tokenizer
        self.names = list(views)
        self.probabilities = np.asarray(list(views.values()))

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        sample = record_to_sample(record)
        view = self.names[rng.choice(len(self.names), p=self.probabilities)]
        if view == "object" and sample.num_layers > 1:
            layer = int(rng.integers(1, sample.num_layers))
            colour = parse_foreground_prompt(sample.layer_prompts[layer])
            others = [c for c in PALETTE if colour is None or c != colour[0]]
            image, prompt = single_object_view(sample, layer, others[rng.integers(len(others))])
        elif view == "background":
            image, prompt = sample.background, sample.layer_prompts[0]
        else:
            image, prompt = sample.composite(), sample.global_prompt
        return {"images": image.astype(np.float32) / 127.5 - 1.0, "ids": self.tokenizer([prompt])[0]}


def stack_batch(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-sample dicts; samples of different sizes are an error that says so."""
    sizes = sorted({e["images"].shape[-3:-1] for e in examples})
    if len(sizes) > 1:
        raise ValueError(f"samples of different image sizes {sizes} in one batch; build the data at one size")
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def batch_shapes(batch_size: int, max_layers: int, resolution: int, token_length: int, *, flat: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of a batch as the module docstring lists them (layered, or `flat` images), square images of
    `resolution` pixels: what a train step is compiled for before any data is read."""
    B, L, H, T = batch_size, max_layers, resolution, token_length
    if flat:
        return {"images": jax.ShapeDtypeStruct((B, H, H, 3), np.float32), "ids": jax.ShapeDtypeStruct((B, T), np.int32)}
    return {
        "images": jax.ShapeDtypeStruct((B, L, H, H, 3), np.float32),
        "masks": jax.ShapeDtypeStruct((B, L, H, H, 1), np.float32),
        "layer_valid": jax.ShapeDtypeStruct((B, L), np.bool_),
        "global_ids": jax.ShapeDtypeStruct((B, T), np.int32),
        "layer_ids": jax.ShapeDtypeStruct((B, L, T), np.int32),
    }


def make_dataloader(
    data: str | os.PathLike | grain.RandomAccessDataSource,
    *,
    batch_size: int,
    max_layers: int,
    tokenizer: PromptTokenizer,
    seed: int,
    split: str = "train",
    shuffle: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    worker_count: int = 0,
    flat_views: dict[str, float] | None = None,
    with_keys: bool = False,
) -> grain.DataLoader:
    """A grain DataLoader over a built dataset (a path, see `open_data_source`) or a data source.

    `batch_size` is per host. Each host reads the disjoint shard `shard_index` of `shard_count`
    (default: `jax.process_index()` of `jax.process_count()`); a last partial batch is dropped.
    `num_epochs=None` repeats forever, reshuffling every epoch. `worker_count > 0` decodes in that many
    worker processes. All samples must share one image size. `flat_views` ({view: probability}, see
    `parse_flat_views`) gives flat images and prompts for text-to-image training instead of layers. `with_keys`
    adds each layered sample's record key to the batch.
    """
    source = open_data_source(data, split) if isinstance(data, (str, os.PathLike)) else data
    if with_keys:
        source = KeyedSource(source)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if len(source) // shard_count < batch_size:
        raise ValueError(
            f"{len(source)} records split over {shard_count} host(s) give fewer than batch_size={batch_size} each"
        )
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; programs that do not use absl never parse them.
        flags.FLAGS.mark_as_parsed()
    # Every host walks the same seeded global order; host i takes positions i, i + n, i + 2n, ...
    sampler = grain.IndexSampler(num_records=len(source), shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            ToFlatImage(tokenizer, flat_views) if flat_views else ToLayerArrays(tokenizer, max_layers),
            grain.Batch(batch_size, drop_remainder=True, batch_fn=stack_batch),
        ],
        worker_count=worker_count,
        shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True),
    )
