"""TFDS builders (no TensorFlow): exact round-trips, bad sample folders, and the build script."""

import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from script_support import load_script

from layerdiff_jax.data.layers import DataError, dilate_mask, list_sample_folders, write_sample_folder
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.data.tfds_builders import (
    build_from_folders,
    build_synthetic,
    find_dataset_dir,
    open_data_source,
    record_to_sample,
    split_sizes,
)

SEED, RES = 5, 32


def _assert_same_sample(a, b):
    for name in ("background", "foregrounds", "masks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.global_prompt == b.global_prompt and a.layer_prompts == b.layer_prompts and a.metadata == b.metadata


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("tfds"), num_train=12, num_test=4, resolution=RES, seed=SEED)


def test_synthetic_build_round_trips_exactly(synthetic_dir):
    assert split_sizes(synthetic_dir) == {"train": 12, "test": 4}
    for split, indices in (("train", range(12)), ("test", range(12, 16))):
        source = open_data_source(synthetic_dir, split)
        seen = []
        for i in range(len(source)):
            sample = record_to_sample(source[i])
            index = sample.metadata["index"]
            _assert_same_sample(sample, generate_sample(SEED, index, RES))
            seen.append(index)
        assert sorted(seen) == list(indices)


def test_dataset_is_found_from_the_build_root(synthetic_dir):
    root = synthetic_dir.parents[2]
    assert find_dataset_dir(root) == synthetic_dir
    with pytest.raises(KeyError, match="split 'validation'"):
        open_data_source(root, "validation")
    with pytest.raises(FileNotFoundError, match="no built dataset"):
        find_dataset_dir(root.parent / "nowhere")


def _export(folder: Path, count: int, seed: int = 0) -> list:
    samples = [generate_sample(seed, i, RES) for i in range(count)]
    for i, s in enumerate(samples):
        write_sample_folder(s, folder / f"sample_{i:05d}")  # as `build_dataset.py export` names them
    return samples


def _break_three(samples_dir: Path) -> dict[str, str]:
    """Damage samples 1 (missing mask), 3 (mask of the wrong size) and 4 (non-image layer)."""
    (samples_dir / "sample_00001" / "mask_01.png").unlink()
    PIL.Image.new("L", (RES, RES // 2)).save(samples_dir / "sample_00003" / "mask_01.png")
    (samples_dir / "sample_00004" / "layer_01.png").write_bytes(b"GIF89a garbage")
    return {
        "sample_00001": "mask_01.png: missing",
        "sample_00003": "mask_01.png: size 16x32",
        "sample_00004": "layer_01.png: not a readable image",
    }


def test_folder_build_with_bad_samples(tmp_path):
    samples = _export(tmp_path / "samples", 6)
    broken = _break_three(tmp_path / "samples")

    with pytest.raises(DataError, match=r"sample_00001/mask_01\.png: missing"):
        build_from_folders(tmp_path / "samples", tmp_path / "out")

    path, skipped = build_from_folders(tmp_path / "samples", tmp_path / "out", skip_bad=True)
    assert sorted(Path(folder).name for folder, _ in skipped) == sorted(broken)
    for folder, reason in skipped:
        assert f"{Path(folder).name}/{broken[Path(folder).name]}" in reason
    source = open_data_source(path)
    kept = {record_to_sample(source[i]).metadata["index"]: record_to_sample(source[i]) for i in range(len(source))}
    assert sorted(kept) == [0, 2, 5]  # nothing else lost
    for index, sample in kept.items():
        _assert_same_sample(sample, samples[index])


def test_folder_splits_from_subfolders(tmp_path):
    _export(tmp_path / "samples" / "train", 3)
    _export(tmp_path / "samples" / "test", 2, seed=1)
    path, skipped = build_from_folders(tmp_path / "samples", tmp_path / "out", name="my data")
    assert skipped == [] and split_sizes(path) == {"train": 3, "test": 2}
    assert path.parent.name == "my_data"




def test_build_script(tmp_path, capsys):
    script = load_script("build_dataset")
    assert script.main(["export", "--out", str(tmp_path / "samples"), "--num", "5", "--resolution", "32"]) == 0
    assert len(list_sample_folders(tmp_path / "samples")) == 5
    _break_three(tmp_path / "samples")
    capsys.readouterr()

    assert script.main(["folder", "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "ds")]) == 1
    assert "sample_00001/mask_01.png: missing" in capsys.readouterr().err

    args = ["folder", "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "ds"), "--skip-bad"]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert "examples: train 2" in out and "skipped: 3" in out and "sample_00004/layer_01.png: not a readable image" in out

    args = ["synthetic", "--out", str(tmp_path / "syn"), "--num-train", "6", "--num-test", "2", "--resolution", "32",
            "--layer-mix", "2:1"]  # fmt: skip
    assert script.main(args) == 0
    assert "examples: train 6, test 2" in capsys.readouterr().out
    source = open_data_source(tmp_path / "syn")
    assert {record_to_sample(source[i]).num_layers for i in range(len(source))} == {2}

    args = ["synthetic", "--out", str(tmp_path / "contrast"), "--num-train", "20", "--num-test", "0", "--resolution", "32",
            "--layer-mix", "4:1", "--foreground-fill", "contrast"]  # fmt: skip
    assert script.main(args) == 0
    source = open_data_source(tmp_path / "contrast")
    surrounds = {}  # layer prompt's colour -> colours outside every mask
    for i in range(len(source)):
        sample = record_to_sample(source[i])
        for prompt, fg, mask in zip(sample.layer_prompts[1:], sample.foregrounds, sample.masks):
            outside = dilate_mask(mask) == 0
            surrounds.setdefault(prompt.split()[1] == "black", set()).update(map(tuple, fg[outside]))
    assert surrounds == {True: {(255, 255, 255)}, False: {(0, 0, 0)}}

    grid = tmp_path / "grid.png"
    assert script.main(["grid", "--out", str(grid), "--num", "3", "--resolution", "32"]) == 0
    width, height = PIL.Image.open(grid).size
    assert width > 3 * 32 and height > 3 * 32


def test_a_damaged_array_record_file_is_named(synthetic_dir, tmp_path):
    from layerdiff_jax.data.loader import make_dataloader
    from layerdiff_jax.data.tokenizer import build_toy_tokenizer

    copy = shutil.copytree(synthetic_dir, tmp_path / "copy")
    damaged = sorted(copy.glob("*train.array_record*"))[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{damaged}: record .* cannot be read .*rebuild the dataset"):
        record_to_sample(open_data_source(copy)[0])
    loader = make_dataloader(copy, batch_size=2, max_layers=4, tokenizer=build_toy_tokenizer(), seed=0)
    with pytest.raises(DataError, match=str(damaged)):
        next(iter(loader))


def test_folder_build_with_nothing_to_build_says_so(tmp_path, capsys):
    script = load_script("build_dataset")
    (tmp_path / "empty").mkdir()
    args = ["folder", "--samples", str(tmp_path / "empty"), "--out", str(tmp_path / "ds"), "--skip-bad"]
    assert script.main(args) == 1
    assert f"{tmp_path / 'empty'}: no sample folders in it" in capsys.readouterr().err
    _export(tmp_path / "bad", 2)
    for folder in (tmp_path / "bad").iterdir():
        (folder / "sample.json").write_text("{")
    args = ["folder", "--samples", str(tmp_path / "bad"), "--out", str(tmp_path / "ds"), "--skip-bad"]
    assert script.main(args) == 1
    err = capsys.readouterr().err
    assert "no readable sample in a split" in err and "2 skipped" in err and "--skip-bad" not in err
    assert "sample_00000/sample.json: not valid JSON" in err and "sample_00001/sample.json: not valid JSON" in err
