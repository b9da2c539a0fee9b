"""tensorflow-datasets builders for layered data, written as array_record without TensorFlow.

Examples hold PNG bytes (tfds encodes numpy images only through TensorFlow), so decoding from the
data source gives back exactly the generator's arrays. Two builders:

- `SyntheticLayers`: the procedural dataset (`synthetic.generate_sample`), configured by resolution,
  seed, split sizes and layer mix.
- `LayeredFolder`: a folder of exchange-format sample folders. Subfolders `train/`, `test/`,
  `validation/` become splits; otherwise every sample goes to `train`. With `skip_bad`, unreadable
  samples are skipped and listed in `builder.skipped` instead of stopping the build.

Read back with `open_data_source(path, split)` and `record_to_sample(record)`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from layerdiff_jax.data.layers import DataError, LayeredSample, list_sample_folders, read_sample_folder
from layerdiff_jax.data.synthetic import DEFAULT_LAYER_MIX, generate_sample

FOLDER_SPLITS = ("train", "validation", "test")


def _features() -> tfds.features.FeaturesDict:
    image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
    return tfds.features.FeaturesDict(
        {
            "background": image,
            "foregrounds": tfds.features.Sequence(image),  # deepest first
            "masks": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 1), encoding_format="png")),
            "global_prompt": tfds.features.Text(),
            "layer_prompts": tfds.features.Sequence(tfds.features.Text()),  # background first
            "metadata": tfds.features.Text(),  # JSON
        }
    )


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def sample_to_example(sample: LayeredSample) -> dict[str, Any]:
    return {
        "background": _png(sample.background),
        "foregrounds": [_png(f) for f in sample.foregrounds],
        "masks": [_png(m) for m in sample.masks],
        "global_prompt": sample.global_prompt,
        "layer_prompts": list(sample.layer_prompts),
        "metadata": json.dumps(sample.metadata, sort_keys=True),
    }


def record_to_sample(record: dict[str, Any]) -> LayeredSample:
    """A decoded data-source record -> LayeredSample."""
    background = record["background"]
    h, w, _ = background.shape
    prompts = [_text(p) for p in record["layer_prompts"]]
    foregrounds = np.stack(record["foregrounds"]) if len(record["foregrounds"]) else np.zeros((0, h, w, 3), np.uint8)
    masks = np.stack(record["masks"])[..., 0] if len(record["masks"]) else np.zeros((0, h, w), np.uint8)
    return LayeredSample(
        background, foregrounds, masks, _text(record["global_prompt"]), prompts, json.loads(_text(record["metadata"]))
    )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class _LayeredBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared by the builders below: features, version, and the description from the config."""

    VERSION = tfds.core.Version("1.0.0")
    # Builders outside the tfds source tree have no checksums file; leaving `code_path` to tfds makes
    # it look for one through `importlib_resources`, which is not installed.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description, features=_features())


@dataclasses.dataclass(eq=False)
class SyntheticLayersConfig(tfds.core.BuilderConfig):
    resolution: int = 64
    seed: int = 0
    num_train: int = 1000
    num_test: int = 100
    layer_mix: dict[int, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LAYER_MIX))
    colour_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    foreground_fill: str = "black"
    similar_colours: float = 0.0


class SyntheticLayers(_LayeredBuilder):
    """Procedural shapes on backgrounds; test samples use indices after the train ones."""

    def _split_generators(self, dl_manager):
        c = self.builder_config
        splits = {"train": range(c.num_train), "test": range(c.num_train, c.num_train + c.num_test)}
        return {name: self._generate_examples(indices) for name, indices in splits.items() if len(indices)}

    def _generate_examples(self, indices):
        c = self.builder_config
        for index in indices:
            yield index, sample_to_example(
                generate_sample(c.seed, index, c.resolution, c.layer_mix, c.colour_weights, c.foreground_fill, c.similar_colours)
            )


@dataclasses.dataclass(eq=False)
class LayeredFolderConfig(tfds.core.BuilderConfig):
    samples_dir: str = ""
    skip_bad: bool = False


def folder_splits(samples_dir: str | os.PathLike) -> dict[str, Path]:
    """{split: folder of sample folders}: the `train/`, `validation/`, `test/` subfolders, else all in `train`."""
    root = Path(samples_dir)
    return {s: root / s for s in FOLDER_SPLITS if (root / s).is_dir()} or {"train": root}


class LayeredFolder(_LayeredBuilder):
    """Exchange-format sample folders (data construction output, generated samples)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: list[tuple[str, str]] = []  # (sample folder, reason)

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(folder) for name, folder in folder_splits(self.builder_config.samples_dir).items()}

    def _generate_examples(self, split_dir: Path):
        for folder in list_sample_folders(split_dir):
            try:
                sample = read_sample_folder(folder)
            except DataError as e:
                if not self.builder_config.skip_bad:
                    raise
                self.skipped.append((str(folder), str(e)))
                continue
            yield folder.name, sample_to_example(sample)


def _config_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]+", "_", text).strip("_") or "samples"


def _prepare(builder: tfds.core.GeneratorBasedBuilder) -> Path:
    """Writes the dataset, replacing an earlier build of the same name (tfds would silently keep it)."""
    config = tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
    with tempfile.TemporaryDirectory() as downloads:  # tfds wants one; nothing is downloaded
        builder.download_and_prepare(download_dir=downloads, download_config=config)
    return Path(builder.data_dir)


def build_synthetic(
    out_dir: str | os.PathLike,
    *,
    num_train: int,
    num_test: int,
    resolution: int = 64,
    seed: int = 0,
    layer_mix: dict[int, float] | None = None,
    colour_weights: dict[str, float] | None = None,
    foreground_fill: str = "black",
    similar_colours: float = 0.0,
) -> Path:
    """Builds the synthetic dataset under `out_dir`; returns the dataset folder (`.../1.0.0`)."""
    mix = dict(DEFAULT_LAYER_MIX if layer_mix is None else layer_mix)
    weights = dict(colour_weights or {})
    config = SyntheticLayersConfig(
        name=f"r{resolution}_s{seed}",
        resolution=resolution,
        seed=seed,
        num_train=num_train,
        num_test=num_test,
        layer_mix=mix,
        colour_weights=weights,
        foreground_fill=foreground_fill,
        similar_colours=similar_colours,
        description=f"Synthetic layered shapes, {resolution}x{resolution}, seed {seed}, layer mix {mix}"
        + (f", colour weights {weights}" if weights else "")
        + (f", foregrounds filled {foreground_fill}" if foreground_fill != "black" else "")
        + (f", {similar_colours:.0%} in similar colours" if similar_colours else ""),
    )
    return _prepare(SyntheticLayers(config=config, data_dir=os.fspath(out_dir), file_format="array_record"))


def build_from_folders(
    samples_dir: str | os.PathLike, out_dir: str | os.PathLike, *, skip_bad: bool = False, name: str | None = None
) -> tuple[Path, list[tuple[str, str]]]:
    """Builds a dataset from exchange-format sample folders; returns (dataset folder, skipped samples).

    Without `skip_bad` the first bad sample raises `DataError` naming its file.
    """
    samples_dir = Path(samples_dir)
    if not samples_dir.is_dir():
        raise DataError(f"{samples_dir}: not a directory")
    for split, folder in folder_splits(samples_dir).items():
        if not list_sample_folders(folder):
            raise DataError(f"{folder}: no sample folders in it (the {split} split would be empty)")
    config = LayeredFolderConfig(
        name=_config_name(name or samples_dir.resolve().name),
        samples_dir=os.fspath(samples_dir),
        skip_bad=skip_bad,
        description=f"Layered samples from {samples_dir}",
    )
    builder = LayeredFolder(config=config, data_dir=os.fspath(out_dir), file_format="array_record")
    try:
        return _prepare(builder), builder.skipped
    except AssertionError as e:  # tfds: "No examples were yielded", when --skip-bad skipped every sample of a split
        skipped = "".join(f"\n  {reason}" for _, reason in builder.skipped)
        raise DataError(f"{samples_dir}: no readable sample in a split ({e}); {len(builder.skipped)} skipped:{skipped}") from None


def find_dataset_dir(path: str | os.PathLike) -> Path:
    """The one folder at or below `path` holding a built dataset (`dataset_info.json`)."""
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("dataset_info.json"))
    if len(found) != 1:
        what = "no built dataset" if not found else f"{len(found)} datasets ({', '.join(map(str, found))})"
        raise FileNotFoundError(f"{path}: expected one built dataset (dataset_info.json), found {what}")
    return found[0]


def split_sizes(path: str | os.PathLike) -> dict[str, int]:
    """{split: number of examples} of a built dataset."""
    builder = tfds.builder_from_directory(os.fspath(find_dataset_dir(path)))
    return {name: split.num_examples for name, split in builder.info.splits.items()}


class NamedDataSource:
    """A tfds data source whose read errors are DataErrors naming the array_record file and record: a damaged
    file otherwise fails deep inside array_record, PIL or grain without a path."""

    def __init__(self, source, split_info):
        self.source = source
        self.files = [str(p) for p in split_info.filepaths]
        self.ends = np.cumsum(split_info.shard_lengths)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:  # grain's checkpoints record it and compare it on restore
        return repr(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except Exception as e:  # array_record, tfds and PIL each raise their own types
            shard = min(int(np.searchsorted(self.ends, int(index), side="right")), len(self.files) - 1)
            raise DataError(
                f"{self.files[shard]}: record {index} cannot be read ({type(e).__name__}: {e}); the file is damaged: "
                "rebuild the dataset"
            ) from None


def open_data_source(path: str | os.PathLike, split: str = "train") -> NamedDataSource:
    """Random-access source of decoded records (`len`, `[i]`) for one split of a built dataset."""
    folder = find_dataset_dir(path)
    builder = tfds.builder_from_directory(os.fspath(folder))
    if split not in builder.info.splits:
        raise KeyError(f"split {split!r} not in {folder} (has {list(builder.info.splits)})")
    split_info = builder.info.splits[split]
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # array_record refuses a damaged file when opening it
        raise DataError(f"{folder}: the {split} split's array_record files cannot be opened ({type(e).__name__}: {e}); "
                        "one is damaged: rebuild the dataset") from None
    return NamedDataSource(source, split_info)
