"""Inputs are read as they are: masks and layers in any PNG mode scaled to 8 bits (or refused by name), prompts
with control characters refused wherever they enter, and a layers.ora whose stack.xml does not parse refused."""

import re
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
from script_support import load_script

from layerdiff_jax.data.layers import DataError, LayeredSample, image_array, mask_file, read_sample_folder, write_sample_folder
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.diffusion.settings import RequestError
from layerdiff_jax.sampling.outputs import ORA_FILE, check_layered_files, write_ora, write_sample
from layerdiff_jax.sampling.sampler import LayerRequest

H, W = 4, 6
CONTROL = ["\x00", "\x1b", "\x0b"]


def tiny_sample(num_fg=1, prompts=None):
    rng = np.random.default_rng(0)
    return LayeredSample(
        background=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        foregrounds=rng.integers(0, 256, (num_fg, H, W, 3), dtype=np.uint8),
        masks=np.full((num_fg, H, W), 255, np.uint8),
        global_prompt="shapes",
        layer_prompts=prompts or ["the background", *[f"shape {i}" for i in range(1, num_fg + 1)]],
    )


def test_a_16_bit_mask_is_scaled_not_clipped(tmp_path):
    folder = write_sample_folder(tiny_sample(), tmp_path / "s")
    PIL.Image.fromarray(np.full((H, W), 30000, np.uint16)).save(folder / mask_file(1))  # 46% alpha, 16-bit
    with PIL.Image.open(folder / mask_file(1)) as img:
        assert img.mode == "I;16"
    masks = read_sample_folder(folder).masks
    assert np.abs(masks.astype(int) - round(30000 / 65535 * 255)).max() <= 1  # 117, not 255


def test_masks_in_other_modes_read_as_their_8_bit_values(tmp_path):
    """Palette with transparency, gray + alpha, 16-bit gray and 1-bit: the gray value composited over black."""
    folder = write_sample_folder(tiny_sample(num_fg=4), tmp_path / "s")
    index = np.zeros((H, W), np.uint8)
    index[:, 3:] = 1
    palette = PIL.Image.frombytes("P", (W, H), index.tobytes())
    palette.putpalette([255, 255, 255, 128, 128, 128])  # white (transparent) | gray (opaque)
    palette.save(folder / mask_file(1), transparency=bytes([0, 255]))
    gray_alpha = np.stack([np.full((H, W), 200, np.uint8), np.full((H, W), 128, np.uint8)], axis=-1)
    PIL.Image.fromarray(gray_alpha).save(folder / mask_file(2))
    deep = np.zeros((H, W), np.uint16)
    deep[:2] = 65535
    PIL.Image.fromarray(deep).save(folder / mask_file(3))
    PIL.Image.fromarray(np.eye(H, W, dtype=bool)).save(folder / mask_file(4))
    modes = []
    for i in range(1, 5):
        with PIL.Image.open(folder / mask_file(i)) as img:
            modes.append(img.mode)
    assert modes == ["P", "LA", "I;16", "1"]

    masks = read_sample_folder(folder).masks
    np.testing.assert_array_equal(masks[0], np.where(index == 1, 128, 0))  # transparent white is outside
    np.testing.assert_array_equal(masks[1], np.full((H, W), 100))  # 200 * 128 / 255
    np.testing.assert_array_equal(masks[2], np.where(deep > 0, 255, 0))
    np.testing.assert_array_equal(masks[3], np.eye(H, W) * 255)


@pytest.mark.parametrize("mode", ["I", "I;16B", "I;16L"])
def test_image_array_scales_every_16_bit_gray_mode(mode):
    img = PIL.Image.new(mode, (W, H), 30000)
    assert image_array(img, "L", "x.png").tolist() == np.full((H, W), 117).tolist()
    assert image_array(img, "RGB", "x.png").shape == (H, W, 3)
    with pytest.raises(DataError, match=r"x.png: mode I with values outside 0..65535"):
        image_array(PIL.Image.new("I", (W, H), 70000), "L", "x.png")


def test_a_float_mask_is_refused_by_name(tmp_path):
    folder = write_sample_folder(tiny_sample(), tmp_path / "s")
    PIL.Image.fromarray(np.full((H, W), 0.46, np.float32)).save(folder / mask_file(1), format="TIFF")
    with pytest.raises(DataError, match=r"mask_01.png: mode F \(floating point\) images are not read"):
        read_sample_folder(folder)


@pytest.mark.parametrize("char", CONTROL)
def test_layer_request_refuses_control_characters(char):
    escaped = re.escape(ascii(char)[1:-1])
    with pytest.raises(RequestError, match=rf"^prompt holds the control character {escaped} at position 3;"):
        LayerRequest(f"red{char}circle", ["a red circle"])
    with pytest.raises(RequestError, match=rf"^layer_prompts\[1\] holds the control character {escaped} at position 0"):
        LayerRequest("shapes", ["a red circle", f"{char}a square"])
    with pytest.raises(RequestError, match=r"^background_prompt holds"):
        LayerRequest("shapes", ["a red circle"], background_prompt=f"sky{char}")


@pytest.mark.parametrize("char", CONTROL)
def test_sample_cli_refuses_control_characters(char, tmp_path, capsys):
    sample_script = load_script("sample")
    base = ["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    escaped = ascii(char)[1:-1]
    for extra, flag in [
        (["--prompt", f"a{char}", "--layer-prompt", "b"], "--prompt"),
        (["--prompt", "a", "--layer-prompt", "b", "--layer-prompt", f"c{char}"], "--layer-prompt #2"),
        (["--prompt", "a", "--layer-prompt", "b", "--background-prompt", f"{char}sky"], "--background-prompt"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample_script.parse_args(base + extra)
        assert e.value.code == 2
        assert f"{flag} holds the control character {escaped}" in capsys.readouterr().err


@pytest.mark.parametrize("char", CONTROL)
def test_edit_cli_refuses_control_characters(char, tmp_path, capsys):
    edit_script = load_script("edit")
    folder = write_sample_folder(tiny_sample(), tmp_path / "s")
    common = ["--checkpoint", str(tmp_path / "model"), "--sample", str(folder), "--out", str(tmp_path / "o"), "--layer", "1"]
    escaped = ascii(char)[1:-1]
    for extra, flag in [
        (["inpaint", "--prompt", f"a{char}b"], "--prompt"),
        (["inpaint", "--prompt", "a", "--global-prompt", f"{char}"], "--global-prompt"),
        (["restyle", "--style", f"in {char} style"], "--style"),
    ]:
        with pytest.raises(SystemExit) as e:
            edit_script.parse_args([extra[0], *common, *extra[1:]])
        assert e.value.code == 2
        assert f"{flag} holds the control character {escaped}" in capsys.readouterr().err


def test_layer_editing_refuses_control_characters():
    from layerdiff_jax.sampling.editing import inpaint_layer, restyle_layer

    # The prompts are checked before the model is used: a stand-in that accepts every setting will do.
    pipe = types.SimpleNamespace(check_settings=lambda **_: None, max_layers=8, image_size=lambda size: size)
    sample = tiny_sample()
    with pytest.raises(RequestError, match=r"^prompt holds the control character \\x1b"):
        inpaint_layer(pipe, sample, 1, "a\x1b[31m red circle")
    with pytest.raises(RequestError, match=r"^global_prompt holds the control character \\x00"):
        inpaint_layer(pipe, sample, 1, "a red circle", global_prompt="shapes\x00")
    with pytest.raises(RequestError, match=r"^style holds the control character \\x0b"):
        restyle_layer(pipe, sample, 1, "striped\x0b")


def test_a_sample_json_with_a_control_character_is_refused_by_name(tmp_path):
    folder = write_sample_folder(tiny_sample(prompts=["the background", "a red\x1b circle"]), tmp_path / "s")
    assert "\\u001b" in (folder / "sample.json").read_text()  # JSON holds it, escaped
    with pytest.raises(DataError, match=r"s/sample.json: layer_prompts\[1\] holds the control character \\x1b at position 5"):
        read_sample_folder(folder)


@pytest.mark.parametrize("char", CONTROL)
def test_write_ora_never_writes_a_stack_xml_that_does_not_parse(char, tmp_path):
    name = f"layer 01: a{char}"
    with pytest.raises(DataError, match=re.escape(f"layers.ora: layer name {name!r} holds {ascii(char)[1:-1]}, which XML cannot hold")):
        write_ora(tiny_sample(prompts=["the background", f"a{char}"]), tmp_path / ORA_FILE)
    assert not (tmp_path / ORA_FILE).exists()


def _replace_in_zip(path, name, data):
    with zipfile.ZipFile(path) as zf:
        entries = [(info, data if info.filename == name else zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for info, content in entries:
            zf.writestr(info, content)


def test_an_ora_with_a_broken_stack_xml_is_refused(tmp_path, capsys):
    samples = tmp_path / "samples"
    for i in range(2):
        write_sample(generate_sample(0, i, 32), samples / f"sample_{i:04d}", formats=("ora",))
    ora = samples / "sample_0001" / ORA_FILE
    good = ora.read_bytes()
    with zipfile.ZipFile(ora) as zf:
        stack = zf.read("stack.xml")
    check_layered_files(ora.parent)

    _replace_in_zip(ora, "stack.xml", stack.replace(b"</stack>", b"\x1b</stack>"))
    with pytest.raises(DataError, match=r"sample_0001/layers.ora: its stack.xml is not valid XML"):
        check_layered_files(ora.parent)
    evaluate = load_script("evaluate").main
    assert evaluate([str(samples), "--out", str(tmp_path / "metrics.json")]) == 1
    assert "sample_0001/layers.ora: its stack.xml is not valid XML" in capsys.readouterr().err

    ora.write_bytes(good)
    _replace_in_zip(ora, "stack.xml", stack.replace(b"data/background.png", b"data/elsewhere.png"))
    with pytest.raises(DataError, match=r"layers.ora: stack.xml names layer files that are not in it: \['data/elsewhere.png'\]"):
        check_layered_files(ora.parent)
    ora.write_bytes(good)
    _replace_in_zip(ora, "mimetype", b"application/zip")
    with pytest.raises(DataError, match=r"layers.ora: not an OpenRaster file \(mimetype b'application/zip'"):
        check_layered_files(ora.parent)
