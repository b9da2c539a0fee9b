"""Layered files in memory, for a browser: uploaded bytes -> `LayeredSample`, and a sample -> bytes to download.

`read_layered_bytes` goes by content, not by the file name:

- OpenRaster (a zip whose `mimetype` is image/openraster): stack.xml lists the layers top first. The bottom layer
  is the background, composited over black (a foreign file's bottom layer may be transparent; ours is opaque and
  reads unchanged); each layer above is a foreground with its alpha as the mask. A layer may be smaller than the
  canvas and offset (Krita writes them so): it is placed on the canvas and cropped to it. Nested stacks (groups)
  are flattened in order; opacity, visibility and blend modes are not applied: layers are read as painted.
- Photoshop (psd-tools): the same, over the layers with pixels, bottom first (groups flattened; adjustment and
  fill layers skipped; layer masks not applied).
- A zip of one exchange-format sample folder (`data/layers.py`), at the top of the zip or inside one folder, as
  `export_bytes(sample, "zip")` writes it: read by `read_sample_files`, the folder reader.

Prompts are the layer names, less our own "background: " / "layer NN: " prefix (`outputs.layer_names`), and
foreign names as they are. The prompts our OpenRaster files record in full (`outputs.ORA_PROMPT`,
`outputs.ORA_GLOBAL_PROMPT`) win over the names; otherwise the global prompt is composed from the layer prompts
(`synthetic.global_prompt`; the background's prompt alone when there is no foreground).

A round trip (sample -> bytes -> sample) keeps every pixel bit for bit in all three kinds, colour under alpha 0
included (our writers and this reader keep it; an editor that saves the file may zero it, which changes nothing
visible). The zip keeps everything; OpenRaster all but the metadata; Photoshop all but the metadata, the global
prompt (composed again) and any layer prompt longer than a layer name (`outputs.MAX_LAYER_NAME`).

An upload is hostile until read: nothing is written to disk, zip member names are never used as paths, and each
limit (`read_layered_bytes`' keywords; generous defaults, a server passes its own) is checked before the work it
bounds: the upload's size before parsing, the member count before the zip's directory is parsed, a member's size
before and while it is decompressed, an image's size before its pixels are decoded, the layer count before any
layer is read. Only PNG layers are decoded (the formats hold nothing else), so no other image decoder sees an
upload. Every refusal is a one-line DataError naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from typing import BinaryIO
from xml.etree import ElementTree

import numpy as np
from psd_tools import PSDImage
from psd_tools.compression import PSDDecompressionWarning

from layerdiff_jax.data import synthetic
from layerdiff_jax.data.layers import (
    SAMPLE_JSON,
    DataError,
    LayeredSample,
    decode_image,
    exchange_files,
    image_array,
    png_bytes,
    read_sample_files,
)
from layerdiff_jax.diffusion.settings import RequestError, check_prompt
from layerdiff_jax.sampling.outputs import (
    ORA_FILE,
    ORA_GLOBAL_PROMPT,
    ORA_MIMETYPE,
    ORA_PROMPT,
    PSD_FILE,
    layer_names,
    layer_pixels,
    write_ora,
    write_psd,
)

MAX_UPLOAD_BYTES = 64 * 2**20  # the upload itself
MAX_MEMBERS = 256  # files in a zip (an ORA, an exchange-format zip)
MAX_MEMBER_BYTES = 128 * 2**20  # one zip member, decompressed
MAX_PIXELS = 4096 * 4096  # the canvas and each layer's image
MAX_LAYERS = 32  # the background included
ZIP_FILE = "layers.zip"
ZIP_SAMPLE_FOLDER = "sample"
_MAX_STACK_XML_BYTES = 2**20  # a stack.xml of the most layers, one line of prompt each, is a few KiB
_MAX_ZIP_NAME_BYTES = 200  # file systems allow 255 bytes a name; a layer name may be 120 four-byte characters
_PSD_SIGNATURE = b"8BPS"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ZIP_DIRECTORY_ENTRY = b"PK\x01\x02"
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, ValueError, zlib.error)
_DRIVE = re.compile(r"[A-Za-z]:")
_OUR_LAYER_NAME = re.compile(r"(?:background|layer \d{2,}): (.*)", re.DOTALL)  # `outputs.layer_names`
_NOT_FILE_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')  # what Windows or POSIX refuse in a file name


@dataclasses.dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_members: int
    max_member_bytes: int
    max_pixels: int
    max_layers: int


# ----------------------------------------------------------------------------- reading


def read_layered_bytes(
    data: bytes,
    name: str,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_members: int = MAX_MEMBERS,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_layers: int = MAX_LAYERS,
) -> LayeredSample:
    """The OpenRaster, Photoshop or exchange-format zip file `data` (an upload called `name`) as a sample; any
    problem, a broken limit included, raises a one-line DataError naming `name`."""
    limits = _Limits(max_bytes, max_members, max_member_bytes, max_pixels, max_layers)
    if len(data) > limits.max_bytes:
        raise DataError(f"{name}: {len(data)} bytes, over the limit of {limits.max_bytes}")
    if data.startswith(_PSD_SIGNATURE):
        return _read_psd(data, name, limits)
    if zipfile.is_zipfile(io.BytesIO(data)):
        with _open_zip(data, name, limits) as zf:
            mimetype = _member(zf, "mimetype", name, limits.max_member_bytes)
            if mimetype is not None and mimetype.strip() == ORA_MIMETYPE:
                return _read_ora(zf, name, limits)
            folder = _sample_folder(zf, name)
            if folder is not None:
                return _read_exchange_zip(zf, folder, name, limits)
    raise DataError(f"{name}: not an OpenRaster, Photoshop or exchange-format zip file")


def _open_zip(data: bytes, name: str, limits: _Limits) -> zipfile.ZipFile:
    """The zip, its member count and names checked: a name that is absolute or climbs out of its folder is never
    used as a path here, but only a hostile file holds one."""
    # Opening parses every entry of the zip's directory, each starting with this signature: counting them bounds
    # that work before it starts.
    if data.count(_ZIP_DIRECTORY_ENTRY) > limits.max_members:
        raise DataError(f"{name}: more than {limits.max_members} files in it")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as e:
        raise DataError(f"{name}: not a readable zip file ({e})") from None
    members = zf.namelist()
    for member in members:
        if member.startswith("/") or "\\" in member or ".." in member.split("/") or _DRIVE.match(member):
            zf.close()
            raise DataError(f"{name}: refused: the member name {member!r} is absolute or climbs out of its folder")
    if len(set(members)) != len(members):
        zf.close()
        raise DataError(f"{name}: refused: it holds two members of the same name")
    return zf


def _member(zf: zipfile.ZipFile, member: str, name: str, max_bytes: int) -> bytes | None:
    """The member's bytes, None when there is no such member. A member over `max_bytes` is refused by its
    declared size, and the read stops at the limit whatever the size declared (a decompression bomb lies about
    it; zipfile stops at the declared size and then fails the checksum, but the limit does not rely on that)."""
    try:
        info = zf.getinfo(member)
    except KeyError:
        return None
    if info.file_size > max_bytes:
        raise DataError(f"{name}/{member}: {info.file_size} bytes decompressed, over the limit of {max_bytes}")
    try:
        with zf.open(info) as f:
            data = f.read(max_bytes + 1)
    except _ZIP_ERRORS as e:
        raise DataError(f"{name}/{member}: damaged ({e})") from None
    if len(data) > max_bytes:
        raise DataError(f"{name}/{member}: more than {max_bytes} bytes decompressed, over the limit")
    return data


def _check_png(data: bytes, where: str, limits: _Limits) -> None:
    """A PNG within the pixel limit, read from its header before anything decodes it."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise DataError(f"{where}: not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    _check_pixels(width, height, where, limits)


def _check_pixels(width: int, height: int, where: str, limits: _Limits) -> None:
    if width * height > limits.max_pixels:
        raise DataError(f"{where}: {width}x{height} pixels, over the limit of {limits.max_pixels}")


def _check_layer_count(count: int, name: str, limits: _Limits) -> None:
    if count == 0:
        raise DataError(f"{name}: no layers in it")
    if count > limits.max_layers:
        raise DataError(f"{name}: {count} layers, over the limit of {limits.max_layers}")


def _sample_folder(zf: zipfile.ZipFile, name: str) -> str | None:
    """Where the zip's exchange-format sample is: "" (at the top) or "<folder>/"; None when it holds none."""
    found = [m for m in zf.namelist() if m.count("/") <= 1 and m.rsplit("/", 1)[-1] == SAMPLE_JSON]
    if len(found) > 1:
        raise DataError(f"{name}: {len(found)} samples in it ({', '.join(found)}); a zip holds one")
    return found[0][: -len(SAMPLE_JSON)] if found else None


def _read_exchange_zip(zf: zipfile.ZipFile, folder: str, name: str, limits: _Limits) -> LayeredSample:
    def read(file: str) -> bytes | None:
        data = _member(zf, folder + file, name, limits.max_member_bytes)
        if data is not None and file != SAMPLE_JSON:
            _check_png(data, f"{name}/{folder}{file}", limits)
        return data

    return read_sample_files(read, f"{name}/{folder}".rstrip("/"), max_layers=limits.max_layers)


def _int_attribute(element: ElementTree.Element, key: str, name: str, default: str | None = None) -> int:
    value = element.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{name}: stack.xml: <{element.tag}> {key}={value!r}, expected an integer") from None


def _read_ora(zf: zipfile.ZipFile, name: str, limits: _Limits) -> LayeredSample:
    stack = _member(zf, "stack.xml", name, _MAX_STACK_XML_BYTES)
    if stack is None:
        raise DataError(f"{name}: no stack.xml in it")
    try:  # expat refuses entity-expansion bombs, and ElementTree fetches no external entity
        image = ElementTree.fromstring(stack)
    except ElementTree.ParseError as e:
        raise DataError(f"{name}: its stack.xml is not valid XML ({e})") from None
    if image.tag != "image":
        raise DataError(f"{name}: its stack.xml holds <{image.tag}>, not an OpenRaster <image>")
    size = _int_attribute(image, "h", name), _int_attribute(image, "w", name)
    if min(size) < 1:
        raise DataError(f"{name}: stack.xml: the canvas is {size[1]}x{size[0]} pixels")
    _check_pixels(size[1], size[0], name, limits)
    elements = list(image.iter("layer"))[::-1]  # stack.xml lists the top layer first, nested stacks in place
    _check_layer_count(len(elements), name, limits)
    pixels = np.zeros((len(elements), *size, 4), np.uint8)
    for layer, out in zip(elements, pixels):
        src = layer.get("src")
        data = _member(zf, src, name, limits.max_member_bytes) if src else None
        if data is None:
            raise DataError(f"{name}: stack.xml names the layer file {src!r}, which is not in it")
        _check_png(data, f"{name}/{src}", limits)
        rgba = decode_image(data, "RGBA", f"{name}/{src}")
        _place(rgba, _int_attribute(layer, "y", name, "0"), _int_attribute(layer, "x", name, "0"), out)
    prompts = [layer.get(ORA_PROMPT, _prompt_from_name(layer.get("name", ""))) for layer in elements]
    return _sample(pixels, prompts, image.get(ORA_GLOBAL_PROMPT), name)


def _read_psd(data: bytes, name: str, limits: _Limits) -> LayeredSample:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PSDDecompressionWarning)  # a damaged channel refused, not read as black
            psd = PSDImage.open(io.BytesIO(data))
            _check_pixels(psd.width, psd.height, name, limits)
            layers = [l for l in psd.descendants() if not l.is_group() and (l.kind == "pixel" or l.has_pixels())]
            _check_layer_count(len(layers), name, limits)
            pixels = np.zeros((len(layers), psd.height, psd.width, 4), np.uint8)
            for layer, out in zip(layers, pixels):
                _check_pixels(layer.width, layer.height, f"{name}: layer {layer.name!r}", limits)
                img = layer.topil()  # None for a layer without pixels: it stays transparent
                if img is not None:
                    _place(image_array(img, "RGBA", f"{name}: layer {layer.name!r}"), layer.top, layer.left, out)
    except DataError:
        raise
    except Exception as e:  # psd-tools raises assorted types on damaged files
        raise DataError(f"{name}: not a readable Photoshop file ({type(e).__name__}: {e})") from None
    return _sample(pixels, [_prompt_from_name(layer.name) for layer in layers], None, name)


def _place(rgba: np.ndarray, top: int, left: int, out: np.ndarray) -> None:
    """Copies `rgba` (h, w, 4) into the canvas `out` (H, W, 4) with its corner at (top, left), cropped to it."""
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + rgba.shape[0], out.shape[0]), min(left + rgba.shape[1], out.shape[1])
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = rgba[y0 - top : y1 - top, x0 - left : x1 - left]


def _prompt_from_name(layer_name: str) -> str:
    """The prompt in one of our layer names; a foreign name is the prompt as it is."""
    ours = _OUR_LAYER_NAME.fullmatch(layer_name)
    return ours.group(1) if ours else layer_name


def _sample(pixels: np.ndarray, prompts: Sequence[str], global_prompt: str | None, name: str) -> LayeredSample:
    """The sample of canvas-sized RGBA layers `pixels` (N, H, W, 4), bottom first."""
    try:
        for i, prompt in enumerate(prompts):
            check_prompt(f"layer_prompts[{i}]", prompt)
        if global_prompt is not None:
            check_prompt("global_prompt", global_prompt)
    except RequestError as e:
        raise DataError(f"{name}: {e}") from None
    if global_prompt is None:
        global_prompt = synthetic.global_prompt(prompts[1:], prompts[0]) if len(prompts) > 1 else prompts[0]
    alpha = pixels[0, ..., 3:].astype(np.uint32)
    background = ((pixels[0, ..., :3] * alpha + 127) // 255).astype(np.uint8)  # over black, rounded
    foregrounds = np.ascontiguousarray(pixels[1:, ..., :3])
    masks = np.ascontiguousarray(pixels[1:, ..., 3])
    return LayeredSample(background, foregrounds, masks, global_prompt, list(prompts))


# ----------------------------------------------------------------------------- exporting


def _zip_file_name(layer_name: str) -> str:
    """"layer 01: a red circle" -> "layer 01 - a red circle.png", safe on every file system."""
    stem = _NOT_FILE_NAME.sub("_", layer_name.replace(": ", " - ", 1))
    return stem.encode("utf-8")[:_MAX_ZIP_NAME_BYTES].decode("utf-8", "ignore") + ".png"


def write_layers_zip(sample: LayeredSample, dest: BinaryIO) -> None:
    """A zip of the layers as RGBA PNGs, bottom first, named like the layers of the layered files, plus the
    exchange-format folder under `sample/` (which `read_layered_bytes` reads back)."""
    files = exchange_files(sample, ZIP_SAMPLE_FOLDER)  # first: a metadata error leaves no half-written zip
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for layer_name, array in zip(layer_names(sample), layer_pixels(sample)):
            zf.writestr(_zip_file_name(layer_name), png_bytes(array))
        for file, data in files.items():
            zf.writestr(f"{ZIP_SAMPLE_FOLDER}/{file}", data)


EXPORTS = {
    "ora": (ORA_FILE, "image/openraster", write_ora),
    "psd": (PSD_FILE, "image/vnd.adobe.photoshop", write_psd),
    "zip": (ZIP_FILE, "application/zip", write_layers_zip),
}


def export_bytes(sample: LayeredSample, kind: str) -> tuple[bytes, str, str]:
    """`sample` as a download of `kind` ("ora", "psd" or "zip"): (the file's bytes, its name, its MIME type)."""
    if kind not in EXPORTS:
        raise ValueError(f"unknown export kind {kind!r}; choose from {sorted(EXPORTS)}")
    file_name, mime_type, write = EXPORTS[kind]
    buf = io.BytesIO()
    write(sample, buf)
    return buf.getvalue(), file_name, mime_type
