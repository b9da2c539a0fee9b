"""Uploaded layered files open in memory (OpenRaster, Photoshop, an exchange-format zip), every export round-trips
bit for bit, and a hostile upload is refused with one line naming it before it costs memory or time."""

import io
import re
import struct
import zipfile
from xml.etree import ElementTree

import numpy as np
import PIL.Image
import pytest
from psd_tools import PSDImage
from psd_tools.constants import Tag

from layerdiff_jax.data.layers import DataError, LayeredSample, exchange_files, png_bytes
from layerdiff_jax.data.synthetic import generate_sample, global_prompt
from layerdiff_jax.sampling.layered_files import export_bytes, read_layered_bytes
from layerdiff_jax.sampling.outputs import MAX_LAYER_NAME, layer_names

NOT_OURS = "not an OpenRaster, Photoshop or exchange-format zip file"


def sample_with_an_empty_mask():
    """A synthetic sample (three layers or more) whose first foreground is invisible but keeps its colour."""
    s = generate_sample(0, 1, 32)
    assert s.num_layers >= 3
    s.masks[0] = 0
    s.foregrounds[0] = 200
    return s


def assert_same(back, s, metadata=None):
    for field in ("background", "foregrounds", "masks"):
        got, want = getattr(back, field), getattr(s, field)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=field)
    assert back.layer_prompts == s.layer_prompts
    assert back.global_prompt == s.global_prompt
    assert back.metadata == (s.metadata if metadata is None else metadata)


def zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return buf.getvalue()


def psd_bytes(layers, size=(32, 24)):
    """A PSD of (name, RGBA array, top, left) layers, bottom first, names stored as Unicode."""
    psd = PSDImage.new("RGB", size)
    for name, array, top, left in layers:
        layer = psd.create_pixel_layer_from_array(array, name="x", top=top, left=left)
        layer.tagged_blocks.set_data(Tag.UNICODE_LAYER_NAME, name)
    buf = io.BytesIO()
    psd.save(buf)
    return buf.getvalue()


def ora_bytes(layers, size=(32, 24)):
    """A foreign OpenRaster file (no prompts recorded) of (name, RGBA array, x, y) layers, bottom first."""
    w, h = size
    image = ElementTree.Element("image", {"version": "0.0.6", "w": str(w), "h": str(h)})
    stack = ElementTree.SubElement(image, "stack")
    members = {"mimetype": b"image/openraster"}
    for i, (name, array, x, y) in reversed(list(enumerate(layers))):
        ElementTree.SubElement(stack, "layer", {"name": name, "src": f"data/{i}.png", "x": str(x), "y": str(y)})
        members[f"data/{i}.png"] = png_bytes(array)
    members["stack.xml"] = ElementTree.tostring(image)
    return zip_bytes(members)


def rgba(h, w, colour, alpha):
    return np.concatenate([np.full((h, w, 3), colour, np.uint8), np.full((h, w, 1), alpha, np.uint8)], -1)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "kind, file_name, mime_type",
    [
        ("ora", "layers.ora", "image/openraster"),
        ("psd", "layers.psd", "image/vnd.adobe.photoshop"),
        ("zip", "layers.zip", "application/zip"),
    ],
)
def test_each_export_reads_back_bit_for_bit(kind, file_name, mime_type):
    s = sample_with_an_empty_mask()
    data, name, mime = export_bytes(s, kind)
    assert (name, mime) == (file_name, mime_type)
    # The zip alone carries the metadata; the synthetic global prompt is the composed one, so PSD keeps it too.
    assert_same(read_layered_bytes(data, name), s, metadata=None if kind == "zip" else {})


def test_openraster_keeps_long_prompts_and_any_global_prompt():
    s = generate_sample(0, 2, 32)
    s.layer_prompts[-1] = "a very long prompt " * 20
    s.global_prompt = "whatever the user typed"
    data, name, _ = export_bytes(s, "ora")
    assert len(layer_names(s)[-1]) == MAX_LAYER_NAME
    assert_same(read_layered_bytes(data, name), s, metadata={})
    back = read_layered_bytes(export_bytes(s, "psd")[0], "layers.psd")  # PSD has only the (shortened) names
    assert back.layer_prompts[-1] == layer_names(s)[-1].removeprefix(f"layer {s.num_layers - 1:02d}: ")


def test_the_zip_holds_named_rgba_layers_and_the_sample_folder():
    s = generate_sample(0, 3, 32)
    s.layer_prompts[1] = 'a/b\\c:d "e"'
    data, _, _ = export_bytes(s, "zip")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        layers = names[: s.num_layers]
        assert layers[:2] == ["background - " + s.layer_prompts[0] + ".png", 'layer 01 - a_b_c_d _e_.png']
        assert sorted(names[s.num_layers :]) == sorted(f"sample/{f}" for f in exchange_files(s))
        top = np.asarray(PIL.Image.open(io.BytesIO(zf.read(layers[-1]))))
        np.testing.assert_array_equal(top, np.concatenate([s.foregrounds[-1], s.masks[-1][..., None]], -1))
    # The exchange folder also reads at the top of a zip.
    flat = zip_bytes(exchange_files(s))
    assert_same(read_layered_bytes(flat, "flat.zip"), s)


def test_a_psd_layer_smaller_than_the_canvas_is_placed_at_its_offset():
    background = rgba(24, 32, 10, 255)
    small = rgba(5, 6, 200, 128)
    data = psd_bytes([("Background", background, 0, 0), ("Sun", small, 3, -2)])
    back = read_layered_bytes(data, "foreign.psd")
    want_mask = np.zeros((24, 32), np.uint8)
    want_mask[3:8, 0:4] = 128  # two columns fall off the left edge
    np.testing.assert_array_equal(back.masks[0], want_mask)
    np.testing.assert_array_equal(back.foregrounds[0][want_mask > 0], np.full((20, 3), 200))
    np.testing.assert_array_equal(back.background, background[..., :3])
    assert back.layer_prompts == ["Background", "Sun"]  # foreign names are the prompts
    assert back.global_prompt == global_prompt(["Sun"], "Background")


def test_our_names_give_prompts_and_foreign_names_are_prompts():
    half = rgba(24, 32, 50, 128)  # a half-transparent bottom layer reads composited over black
    cat, sun = rgba(4, 4, 9, 255), rgba(2, 2, 1, 255)
    layers = [("background: a grey sky", half, 0, 0), ("layer 01: a cat", cat, 30, 20), ("Sun", sun, 1, 1)]
    back = read_layered_bytes(ora_bytes(layers), "foreign.ora")
    assert back.layer_prompts == ["a grey sky", "a cat", "Sun"]
    assert back.global_prompt == global_prompt(["a cat", "Sun"], "a grey sky")
    np.testing.assert_array_equal(back.background, np.full((24, 32, 3), 25))  # 50 * 128 / 255, rounded
    assert back.masks[0].sum() == 2 * 4 * 255 and back.masks[0][22:, 30:].all()  # x=30: cropped to 2 columns
    psd_layers = [("background: a grey sky", rgba(24, 32, 50, 255), 0, 0), ("layer 07: a cat", cat, 0, 0)]
    assert read_layered_bytes(psd_bytes(psd_layers), "a.psd").layer_prompts == ["a grey sky", "a cat"]


# ----------------------------------------------------------------------------- hostile and broken uploads


@pytest.mark.parametrize("member", ["../evil", "sample/../../evil", "/etc/passwd", "a\\b.png", "C:/x.png"])
def test_a_member_name_pointing_elsewhere_is_refused(member):
    s = generate_sample(0, 1, 32)
    data = zip_bytes({**{f"sample/{f}": d for f, d in exchange_files(s).items()}, member: b"x"})
    with pytest.raises(DataError, match=re.escape(f"up.zip: refused: the member name {member!r} is absolute")):
        read_layered_bytes(data, "up.zip")


def _declare_size(data, size):
    """The zip `data` (one member) with the member's declared uncompressed size changed in both headers."""
    data = bytearray(data)
    central = data.rindex(b"PK\x01\x02")
    data[22:26] = struct.pack("<I", size)  # local header, at the start
    data[central + 24 : central + 28] = struct.pack("<I", size)
    return bytes(data)


def test_a_zip_bomb_is_refused_without_being_read_whole():
    bomb = zip_bytes({"sample.json": b" " * (16 * 2**20)})  # 16 MiB in about 16 KiB
    assert len(bomb) < 100_000
    declared = r"^bomb.zip/sample.json: 16777216 bytes decompressed, over the limit of 1048576$"
    with pytest.raises(DataError, match=declared):  # by its declared size: nothing is decompressed
        read_layered_bytes(bomb, "bomb.zip", max_member_bytes=2**20)
    # Declared small, it stops at what it declares (zipfile reads no further) and its checksum fails.
    with pytest.raises(DataError, match=r"^bomb.zip/sample.json: damaged \(Bad CRC-32"):
        read_layered_bytes(_declare_size(bomb, 1000), "bomb.zip", max_member_bytes=2**20)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    s = generate_sample(0, 1, 32)
    files = exchange_files(s)
    png = bytearray(files["mask_01.png"])
    png[16:24] = struct.pack(">II", 100_000, 100_000)  # the header's size (its checksum now wrong)
    data = zip_bytes({**files, "mask_01.png": bytes(png)})
    with pytest.raises(DataError, match=r"^big.zip/mask_01.png: 100000x100000 pixels, over the limit of 16777216$"):
        read_layered_bytes(data, "big.zip")
    for kind in ("ora", "psd"):
        with pytest.raises(DataError, match=rf"^s.{kind}: 32x32 pixels, over the limit of 1023$"):
            read_layered_bytes(export_bytes(s, kind)[0], f"s.{kind}", max_pixels=32 * 32 - 1)


def test_layers_of_another_size_in_an_exchange_zip_are_refused():
    s = generate_sample(0, 1, 32)
    data = zip_bytes({**exchange_files(s), "mask_01.png": png_bytes(np.zeros((16, 32), np.uint8))})
    with pytest.raises(DataError, match=r"^up.zip/mask_01.png: size 16x32 but sample.json says 32x32$"):
        read_layered_bytes(data, "up.zip")


@pytest.mark.parametrize("kind", ["ora", "psd", "zip"])
def test_limits_on_bytes_layers_and_members(kind):
    s = generate_sample(0, 1, 32)
    data, _, _ = export_bytes(s, kind)
    with pytest.raises(DataError, match=rf"^up: {len(data)} bytes, over the limit of 100$"):
        read_layered_bytes(data, "up", max_bytes=100)
    with pytest.raises(DataError, match=rf"^up(/sample/sample.json)?: {s.num_layers} layers, over the limit of 2$"):
        read_layered_bytes(data, "up", max_layers=2)
    if kind != "psd":
        with pytest.raises(DataError, match=r"^up: more than 3 files in it$"):
            read_layered_bytes(data, "up", max_members=3)


@pytest.mark.parametrize("data", [b"", b"garbage" * 100, zip_bytes({"notes.txt": b"hello"}), b"8BPS broken"])
def test_other_bytes_are_refused_in_one_line(data):
    with pytest.raises(DataError) as e:
        read_layered_bytes(data, "upload.bin")
    message = str(e.value)
    assert "\n" not in message and message.startswith("upload.bin: ")
    if not data.startswith(b"8BPS"):
        assert message == f"upload.bin: {NOT_OURS}"


def test_a_control_character_in_a_layer_name_is_refused():
    data = psd_bytes([("Background", rgba(24, 32, 0, 255), 0, 0), ("layer 01: a\x1bcat", rgba(2, 2, 0, 255), 0, 0)])
    with pytest.raises(DataError, match=r"^a.psd: layer_prompts\[1\] holds the control character \\x1b at position 1"):
        read_layered_bytes(data, "a.psd")
    s = generate_sample(0, 1, 32)
    s.layer_prompts[1] = "a\tcat"  # XML holds a tab: the OpenRaster file is written, and refused on the way in
    with pytest.raises(DataError, match=r"^a.ora: layer_prompts\[1\] holds the control character \\t"):
        read_layered_bytes(export_bytes(s, "ora")[0], "a.ora")


def test_an_openraster_file_that_names_a_missing_layer_is_refused():
    data = ora_bytes([("bg", rgba(24, 32, 0, 255), 0, 0)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = {m: zf.read(m) for m in zf.namelist() if m != "data/0.png"}
    with pytest.raises(DataError, match=r"^x.ora: stack.xml names the layer file 'data/0.png', which is not in it$"):
        read_layered_bytes(zip_bytes(members), "x.ora")


def test_a_sample_without_foregrounds_round_trips():
    s = generate_sample(0, 1, 32)
    s = LayeredSample(s.background, s.foregrounds[:0], s.masks[:0], s.layer_prompts[0], s.layer_prompts[:1])
    for kind in ("ora", "psd", "zip"):
        assert_same(read_layered_bytes(export_bytes(s, kind)[0], kind), s, metadata={})
