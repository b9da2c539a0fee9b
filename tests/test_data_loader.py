"""grain pipeline: batch contents equal the generator's output, host shards, resumable state, workers."""

import hashlib

import numpy as np
import pytest

from layerdiff_jax.data.layers import write_sample_folder
from layerdiff_jax.data.loader import batch_shapes, make_dataloader
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.data.tfds_builders import build_from_folders, build_synthetic, open_data_source, record_to_sample
from layerdiff_jax.data.tokenizer import load_tokenizer

SEED, RES, NUM, MAX_LAYERS = 11, 32, 20, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("tfds"), num_train=NUM, num_test=0, resolution=RES, seed=SEED)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("toy")


def _loader(data_dir, tokenizer, **kwargs):
    kwargs = {"batch_size": 2, "max_layers": MAX_LAYERS, "tokenizer": tokenizer, "seed": 0, **kwargs}
    return make_dataloader(data_dir, **kwargs)


def _expected(sample, tokenizer):
    """The batch entry for `sample`, computed here independently of the pipeline; images as uint8."""
    n = sample.num_layers
    images = np.zeros((MAX_LAYERS, RES, RES, 3), np.uint8)
    masks = np.zeros((MAX_LAYERS, RES, RES, 1), np.float32)
    images[0] = sample.background
    masks[0, ..., 0] = sample.masks.max(axis=0) == 0  # binary, non-overlapping masks: m_b = 1 - sum m_i
    for i in range(1, n):
        images[i] = sample.foregrounds[i - 1]
        masks[i, ..., 0] = sample.masks[i - 1] / 255
    prompts = sample.layer_prompts + [""] * (MAX_LAYERS - n)
    return {
        "images": images,
        "masks": masks,
        "layer_valid": np.arange(MAX_LAYERS) < n,
        "global_ids": tokenizer([sample.global_prompt])[0],
        "layer_ids": tokenizer(prompts),
    }


def _fingerprints(batches):
    return [hashlib.sha1(b["images"][i].tobytes()).hexdigest() for b in batches for i in range(len(b["images"]))]


def test_batches_equal_the_generator_output(data_dir, tokenizer):
    source = open_data_source(data_dir)
    order = [record_to_sample(source[i]).metadata["index"] for i in range(len(source))]
    batches = list(_loader(data_dir, tokenizer, batch_size=4, shuffle=False, num_epochs=1))
    assert len(batches) == NUM // 4
    b = batches[0]
    assert b["images"].shape == (4, MAX_LAYERS, RES, RES, 3) and b["images"].dtype == np.float32
    assert b["masks"].shape == (4, MAX_LAYERS, RES, RES, 1) and b["masks"].dtype == np.float32
    assert b["layer_valid"].dtype == bool and b["global_ids"].shape == (4, 77) and b["global_ids"].dtype == np.int32
    assert b["layer_ids"].shape == (4, MAX_LAYERS, 77)
    # What a train step is compiled for ahead of time (layerdiff_jax.aot) is what the loader gives.
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (s.shape, s.dtype) for k, s in batch_shapes(4, MAX_LAYERS, RES, 77).items()}
    layer_counts = set()
    for position, (batch, i) in enumerate((batch, i) for batch in batches for i in range(4)):
        want = _expected(generate_sample(SEED, order[position], RES), tokenizer)
        images = batch["images"][i]
        assert images.min() >= -1 and images.max() <= 1
        padded = ~want["layer_valid"]
        assert (images[padded] == 0).all()
        # [-1, 1] floats map back to exactly the generator's uint8 pixels.
        np.testing.assert_array_equal(np.round((images[~padded] + 1) * 127.5), want.pop("images")[~padded])
        for key, value in want.items():
            np.testing.assert_array_equal(batch[key][i], value, err_msg=key)
        layer_counts.add(int(batch["layer_valid"][i].sum()))
    assert layer_counts == {2, 3, 4}  # padding was exercised


def test_hosts_read_disjoint_shards(data_dir, tokenizer):
    hosts = [
        _fingerprints(_loader(data_dir, tokenizer, shard_index=h, shard_count=2, num_epochs=1)) for h in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == NUM // 2
    assert not set(hosts[0]) & set(hosts[1])
    assert len(set(hosts[0]) | set(hosts[1])) == NUM
    # Defaults come from jax.process_index()/process_count(): one process here, so the whole set.
    assert len(set(_fingerprints(_loader(data_dir, tokenizer, num_epochs=1)))) == NUM


def test_shuffle_is_seeded_and_reshuffles_each_epoch(data_dir, tokenizer):
    a = _fingerprints(_loader(data_dir, tokenizer, seed=1, num_epochs=2))
    assert a == _fingerprints(_loader(data_dir, tokenizer, seed=1, num_epochs=2))
    assert a != _fingerprints(_loader(data_dir, tokenizer, seed=2, num_epochs=2))
    assert sorted(a[:NUM]) == sorted(a[NUM:]) and a[:NUM] != a[NUM:]


def test_restored_iterator_continues_the_same_stream(data_dir, tokenizer):
    it = iter(_loader(data_dir, tokenizer, batch_size=4))  # 5 batches per epoch, repeating
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]  # crosses into the second epoch
    resumed = iter(_loader(data_dir, tokenizer, batch_size=4))
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(5)]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_give_the_same_batches(data_dir, tokenizer):
    serial = _fingerprints(_loader(data_dir, tokenizer, num_epochs=1))
    assert _fingerprints(_loader(data_dir, tokenizer, num_epochs=1, worker_count=1)) == serial


def test_bad_settings_are_clear_errors(data_dir, tokenizer):
    with pytest.raises(ValueError, match="exceeds max_layers=3"):
        list(_loader(data_dir, tokenizer, max_layers=3, num_epochs=1))
    with pytest.raises(ValueError, match="fewer than batch_size=16"):
        _loader(data_dir, tokenizer, batch_size=16, shard_count=2, shard_index=0)
    with pytest.raises(ValueError, match="shard_index=2"):
        _loader(data_dir, tokenizer, shard_index=2, shard_count=2)


def test_mixed_image_sizes_are_a_clear_error(tmp_path, tokenizer):
    for name, size in (("a", 32), ("b", 48)):
        write_sample_folder(generate_sample(0, 0, size), tmp_path / "samples" / name)
    path, _ = build_from_folders(tmp_path / "samples", tmp_path / "out")
    with pytest.raises(ValueError, match=r"different image sizes \[\(32, 32\), \(48, 48\)\]"):
        next(iter(_loader(path, tokenizer)))
