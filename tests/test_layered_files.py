"""Layered files re-open with the right layers: OpenRaster by unzipping it, PSD with psd-tools (and PIL); any
prompt survives in both; a sample folder is written all at once and a failing format loses nothing else."""

import io
import zipfile
from xml.etree import ElementTree

import numpy as np
import PIL.Image
import pytest
from psd_tools import PSDImage

from layerdiff_jax.data.layers import DataError, ExtraFileError, LayeredSample, read_sample_folder
from layerdiff_jax.sampling import outputs
from layerdiff_jax.sampling.outputs import (
    CONTACT_SHEET,
    ORA_FILE,
    PSD_FILE,
    check_layered_files,
    layer_names,
    write_contact_sheet,
    write_ora,
    write_psd,
    write_sample,
)

H, W = 24, 40  # not square, so a swapped width and height shows


@pytest.fixture
def sample():
    """Background + 2 foregrounds with soft, overlapping masks (generated masks can be anything in 0..255)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    masks = np.stack([(x * 255 // (W - 1)), (y * 255 // (H - 1))]).astype(np.uint8)
    masks[0, :4] = 0
    return LayeredSample(
        background=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        foregrounds=rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8),
        masks=masks,
        global_prompt="a red circle and a blue square",
        layer_prompts=["the background", "a red circle", "a blue square " + "x" * 200],
        metadata={"seed": 3},
    )


def png(data: bytes) -> PIL.Image.Image:
    img = PIL.Image.open(io.BytesIO(data))
    img.load()
    return img


def expected_layers(sample):
    """RGBA bottom to top."""
    opaque = np.full((H, W, 1), 255, np.uint8)
    return [np.concatenate([sample.background, opaque], -1)] + [
        np.concatenate([fg, m[..., None]], -1) for fg, m in zip(sample.foregrounds, sample.masks)
    ]


def test_layer_names(sample):
    names = layer_names(sample)
    assert names[:2] == ["background: the background", "layer 01: a red circle"]
    assert names[2].startswith("layer 02: a blue square xxx") and names[2].endswith("...") and len(names[2]) == 120


def test_openraster_reopens_by_unzipping(sample, tmp_path):
    path = write_ora(sample, tmp_path / "layers.ora")
    with zipfile.ZipFile(path) as zf:
        first = zf.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert zf.read("mimetype") == b"image/openraster"
        root = ElementTree.fromstring(zf.read("stack.xml"))
        assert root.tag == "image" and (root.get("w"), root.get("h")) == (str(W), str(H))
        layers = root.find("stack").findall("layer")
        # stack.xml lists the top layer first.
        assert [l.get("name") for l in layers] == layer_names(sample)[::-1]
        pixels = [png(zf.read(l.get("src"))) for l in layers][::-1]
        assert all(p.mode == "RGBA" and p.size == (W, H) for p in pixels)
        for got, want in zip(pixels, expected_layers(sample)):
            np.testing.assert_array_equal(np.asarray(got), want)
        merged = png(zf.read("mergedimage.png"))
        np.testing.assert_array_equal(np.asarray(merged.convert("RGB")), sample.composite())
        thumb = png(zf.read("Thumbnails/thumbnail.png"))
        assert max(thumb.size) <= 256


def test_psd_reopens_with_psd_tools_and_pil(sample, tmp_path):
    path = write_psd(sample, tmp_path / "layers.psd")
    psd = PSDImage.open(path)
    assert (psd.width, psd.height) == (W, H) and len(psd) == 3
    assert [layer.name for layer in psd] == layer_names(sample)  # psd-tools lists the bottom layer first
    for layer, want in zip(psd, expected_layers(sample)):
        assert layer.kind == "pixel" and layer.offset == (0, 0) and layer.size == (W, H)
        assert layer.mask is None  # alpha is the layer's transparency, not a layer mask
        np.testing.assert_array_equal(np.asarray(layer.topil()), want)
    # The merged preview (what viewers without layer support show) is the composite.
    merged = np.asarray(psd.topil().convert("RGB")).astype(int)
    assert np.abs(merged - sample.composite()).max() <= 1

    with PIL.Image.open(path) as img:  # a second, independent reader
        assert [name for name, *_ in img.layers] == layer_names(sample)


def test_write_sample_folder_with_layered_files_and_contact_sheet(sample, tmp_path):
    folder = write_sample(sample, tmp_path / "s")
    assert {p.name for p in folder.iterdir()} == {
        "composite.png", "background.png", "layer_01.png", "layer_02.png", "mask_01.png", "mask_02.png",
        "sample.json", ORA_FILE, PSD_FILE,
    }
    with PIL.Image.open(folder / "layer_02.png") as img:  # real transparency: RGBA with the mask as alpha
        assert img.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(img)[..., 3], sample.masks[1])
    back = read_sample_folder(folder)
    np.testing.assert_array_equal(back.masks, sample.masks)
    assert back.layer_prompts == sample.layer_prompts and back.metadata == {"seed": 3}
    assert {p.name for p in write_sample(sample, tmp_path / "plain", formats=()).iterdir()} >= {"sample.json"}
    assert not (tmp_path / "plain" / ORA_FILE).exists()
    with pytest.raises(ValueError, match="unknown layered format"):
        write_sample(sample, tmp_path / "bad", formats=("tiff",))

    sheet = write_contact_sheet([sample, sample], tmp_path / CONTACT_SHEET, cell=32)
    with PIL.Image.open(sheet) as img:
        assert img.size[0] > 4 * 32 and img.size[1] > 2 * 32


def test_any_prompt_survives_in_both_layered_files(sample, tmp_path):
    """Emoji and CJK prompts: the PSD's Unicode layer names carry them in full, its legacy names are ASCII."""
    sample.layer_prompts = ["背景 the background", "a red circle 🔴", "a blue square ✨"]
    folder = write_sample(sample, tmp_path / "s")
    names = layer_names(sample)
    psd = PSDImage.open(folder / PSD_FILE)
    assert [layer.name for layer in psd] == names and len(psd) == 3
    with PIL.Image.open(folder / PSD_FILE) as img:  # PIL reads the legacy Pascal-string names
        assert [name for name, *_ in img.layers] == ["background: ?? the background", "layer 01: a red circle ?", "layer 02: a blue square ?"]
    with zipfile.ZipFile(folder / ORA_FILE) as zf:
        stack = ElementTree.fromstring(zf.read("stack.xml")).find("stack")
        assert [l.get("name") for l in stack.findall("layer")] == names[::-1]
    assert read_sample_folder(folder).layer_prompts == sample.layer_prompts


def test_a_failing_layered_format_loses_nothing_else(sample, tmp_path, monkeypatch):
    def broken(sample, path):
        path.write_bytes(b"half a file")
        raise UnicodeEncodeError("macroman", "🔴", 0, 1, "simulated")

    monkeypatch.setitem(outputs._WRITERS, "psd", (PSD_FILE, broken))
    with pytest.raises(ExtraFileError, match=r"s: written without layers.psd \(UnicodeEncodeError"):
        write_sample(sample, tmp_path / "s")
    files = {p.name for p in (tmp_path / "s").iterdir()}
    assert ORA_FILE in files and "sample.json" in files and PSD_FILE not in files
    assert read_sample_folder(tmp_path / "s").layer_prompts == sample.layer_prompts
    check_layered_files(tmp_path / "s")


def test_a_kill_while_writing_leaves_no_partial_folder(sample, tmp_path, monkeypatch):
    """A folder is written under a staging name and renamed when complete: a write stopped inside a writer
    (KeyboardInterrupt stands in for a kill) leaves no folder under the sample's name, and an earlier
    complete folder of that name stays as it was."""
    def killed(sample, path):
        path.write_bytes(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt

    monkeypatch.setitem(outputs._WRITERS, "ora", (ORA_FILE, killed))
    with pytest.raises(KeyboardInterrupt):
        write_sample(sample, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    write_sample(sample, tmp_path / "old", formats=("psd",))
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        write_sample(sample, tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_check_layered_files_finds_a_file_cut_short(sample, tmp_path):
    folder = write_sample(sample, tmp_path / "s")
    check_layered_files(folder)
    for name in (ORA_FILE, PSD_FILE):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=name):
            check_layered_files(folder)
        (folder / name).write_bytes(data)
