"""Layered sample format: composition, dilation, exchange folders and their error messages."""

import json

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from layerdiff_jax.data.layers import (
    DataError,
    LayeredSample,
    background_mask,
    compose,
    cut_foreground,
    dilate_mask,
    list_sample_folders,
    read_sample_folder,
    write_sample_folder,
)
from layerdiff_jax.data.synthetic import generate_sample


def _hand_made_layers():
    """1x3 image, 2 foregrounds; masks do not overlap and one is soft."""
    background = np.array([[[10, 20, 30], [40, 50, 60], [70, 80, 90]]], np.float32)
    foregrounds = np.array(
        [
            [[[200, 0, 0], [200, 0, 0], [200, 0, 0]]],
            [[[0, 100, 0], [0, 100, 0], [0, 100, 0]]],
        ],
        np.float32,
    )
    masks = np.array([[[[1.0], [0.0], [0.0]]], [[[0.0], [0.25], [0.0]]]], np.float32)
    return background, foregrounds, masks


def test_compose_matches_the_formula_on_hand_made_layers():
    background, foregrounds, masks = _hand_made_layers()
    # x = m_b * B + sum_i m_i * F_i, m_b = 1 - sum_i m_i, written out pixel by pixel.
    expected = np.array([[[200, 0, 0], [0.75 * 40, 0.75 * 50 + 25, 0.75 * 60], [70, 80, 90]]], np.float32)
    np.testing.assert_allclose(compose(background, foregrounds, masks), expected, rtol=0, atol=1e-5)
    m_b = background_mask(masks)
    np.testing.assert_allclose(m_b[..., 0], [[0.0, 0.75, 1.0]])
    formula = m_b * background + (masks * foregrounds).sum(axis=0)
    np.testing.assert_allclose(compose(background, foregrounds, masks), formula, atol=1e-5)


def test_compose_is_back_to_front_over_for_overlapping_masks_and_runs_on_jax():
    background, foregrounds, _ = _hand_made_layers()
    masks = np.array([[[[1.0], [1.0], [0.0]]], [[[0.5], [0.0], [0.0]]]], np.float32)
    out = compose(background, foregrounds, masks)
    np.testing.assert_allclose(out[0, 0], 0.5 * foregrounds[1, 0, 0] + 0.5 * foregrounds[0, 0, 0])
    np.testing.assert_allclose(out[0, 1], foregrounds[0, 0, 1])
    batched = compose(jnp.asarray(background)[None], jnp.asarray(foregrounds)[None], jnp.asarray(masks)[None])
    np.testing.assert_allclose(np.asarray(batched[0]), out, atol=1e-5)


def test_dilate_mask_grows_by_the_5x5_kernel():
    mask = np.zeros((9, 9), np.uint8)
    mask[4, 4] = 255
    d = dilate_mask(mask)
    assert d[2:7, 2:7].min() == 255 and d.sum() == 25 * 255
    corner = np.zeros((6, 6), np.float32)
    corner[0, 0], corner[5, 5] = 0.5, 1.0
    d = dilate_mask(corner)
    assert d[0, 0] == 0.5 and d[2, 2] == 0.5 and d[3, 3] == 1.0 and d[3, 0] == 0.0
    assert dilate_mask(mask, kernel_size=3).sum() == 9 * 255
    stacked = dilate_mask(np.stack([mask, np.zeros_like(mask)]))
    assert stacked.shape == (2, 9, 9) and stacked[1].max() == 0


def test_cut_foreground_keeps_the_dilated_ring():
    image = np.arange(9 * 9 * 3, dtype=np.uint8).reshape(9, 9, 3)
    mask = np.zeros((9, 9), np.uint8)
    mask[4, 4] = 255
    f = cut_foreground(image, mask)
    np.testing.assert_array_equal(f[2:7, 2:7], image[2:7, 2:7])
    assert f[:2].max() == 0 and f[7:].max() == 0 and f[:, :2].max() == 0
    filled = cut_foreground(image, mask, fill=(10, 20, 30))
    np.testing.assert_array_equal(filled[2:7, 2:7], image[2:7, 2:7])
    assert (filled[:2] == (10, 20, 30)).all() and (filled[7:] == (10, 20, 30)).all()


def test_synthetic_composite_is_the_drawn_image_and_layers_validate():
    s = generate_sample(0, 1, resolution=32)
    composite = s.composite()
    inside = s.masks.max(axis=0) == 0
    np.testing.assert_array_equal(composite[inside], s.background[inside])
    for fg, m in zip(s.foregrounds, s.masks):
        np.testing.assert_array_equal(composite[m > 0], fg[m > 0])
    with pytest.raises(DataError, match="masks must be"):
        LayeredSample(s.background, s.foregrounds, s.masks[:, :5], s.global_prompt, s.layer_prompts)
    with pytest.raises(DataError, match="foregrounds must be"):
        LayeredSample(s.background, s.foregrounds, s.masks, s.global_prompt, s.layer_prompts[:-1])


def test_exchange_folder_round_trip(tmp_path):
    s = generate_sample(3, 5, resolution=32, layer_mix={4: 1.0})
    folder = write_sample_folder(s, tmp_path / "sample")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "background.png", "composite.png", "layer_01.png", "layer_02.png", "layer_03.png",
        "mask_01.png", "mask_02.png", "mask_03.png", "sample.json",
    ]  # fmt: skip
    rgba = np.asarray(PIL.Image.open(folder / "layer_02.png"))
    assert rgba.shape == (32, 32, 4)
    np.testing.assert_array_equal(rgba[..., 3], s.masks[1])
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(folder / "composite.png")), s.composite())
    info = json.loads((folder / "sample.json").read_text())
    assert info["num_layers"] == 4 and info["size"] == [32, 32] and info["seed"] == 3

    back = read_sample_folder(folder)
    for name in ("background", "foregrounds", "masks"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))
    assert back.global_prompt == s.global_prompt and back.layer_prompts == s.layer_prompts
    assert back.metadata == s.metadata


@pytest.fixture
def sample_folder(tmp_path):
    return write_sample_folder(generate_sample(0, 1, resolution=32, layer_mix={3: 1.0}), tmp_path / "s")


def test_missing_mask_names_the_file(sample_folder):
    (sample_folder / "mask_02.png").unlink()
    with pytest.raises(DataError, match=r"mask_02\.png: missing"):
        read_sample_folder(sample_folder)


def test_wrong_size_mask_names_the_file(sample_folder):
    PIL.Image.new("L", (16, 32)).save(sample_folder / "mask_01.png")
    with pytest.raises(DataError, match=r"mask_01\.png: size 32x16 but sample\.json says 32x32"):
        read_sample_folder(sample_folder)


def test_non_image_names_the_file(sample_folder):
    (sample_folder / "layer_01.png").write_text("not a png")
    with pytest.raises(DataError, match=r"layer_01\.png: not a readable image"):
        read_sample_folder(sample_folder)


def test_bad_sample_json_names_the_field(sample_folder):
    info = json.loads((sample_folder / "sample.json").read_text())
    del info["layer_prompts"]
    (sample_folder / "sample.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"sample\.json: missing field\(s\) \['layer_prompts'\]"):
        read_sample_folder(sample_folder)
    info["layer_prompts"] = ["only one"]
    (sample_folder / "sample.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="list of 3 strings"):
        read_sample_folder(sample_folder)
    (sample_folder / "sample.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_sample_folder(sample_folder)


def test_metadata_may_not_shadow_required_fields(tmp_path):
    s = generate_sample(0, 0, resolution=32)
    s.metadata["size"] = 3
    with pytest.raises(DataError, match="clash"):
        write_sample_folder(s, tmp_path / "s")


def test_list_sample_folders_skips_files_and_hidden(tmp_path):
    for name in ("b", "a", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_sample_folders(tmp_path)] == ["a", "b"]
    with pytest.raises(DataError, match="not a directory"):
        list_sample_folders(tmp_path / "notes.txt")
