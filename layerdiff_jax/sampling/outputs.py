"""Writing layered results: exchange-format folders, layered files for design tools, contact sheets.

Each sample folder is the data exchange format (`data/layers.py`: composite.png, background.png,
layer_NN.png as RGBA with the mask as alpha, mask_NN.png, sample.json), so samples re-import for editing,
plus the same layers as a file that image editors open:

- OpenRaster (`layers.ora`; GIMP, Krita, MyPaint): a zip of PNGs and stack.xml, written here with
  `zipfile`. The format is a few lines of spec, and the one PyPI writer (pyora) has had no release since 2021.
  stack.xml also records the prompts in full, as attributes in our own namespace (`layerdiff:global-prompt` on
  <image>, `layerdiff:prompt` on each <layer>): layer names are shortened, and the global prompt has no place
  in the format. Readers ignore attributes they do not know; an editor that saves the file drops them.
- Photoshop (`layers.psd`; Photoshop, GIMP, Photopea, Affinity): written with psd-tools. Foregrounds keep
  their alpha in the layer's own transparency channel (real transparency, not a layer mask). Layer names
  are stored twice, as PSD does: in full in the Unicode layer name block ('luni', which editors show), and
  as an ASCII rendering in the legacy Pascal-string name (Mac Roman in psd-tools), so any prompt survives.

Layer order in both: background at the bottom, then the foregrounds deepest to shallowest.

`write_sample` writes the folder all at once (`data/layers.write_sample_folder`): a layered file that fails
is left out, the rest is written, and the failure is raised after (`ExtraFileError`).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO
from xml.etree import ElementTree

import numpy as np
import PIL.Image
from psd_tools import PSDImage
from psd_tools.constants import Tag

from layerdiff_jax.data.layers import DataError, LayeredSample, layer_file, png_bytes, write_sample_folder
from layerdiff_jax.data.visualize import sample_grid

ORA_FILE = "layers.ora"
PSD_FILE = "layers.psd"
CONTACT_SHEET = "contact_sheet.png"
LAYERED_FORMATS = ("ora", "psd")
ORA_MIMETYPE = b"image/openraster"
ORA_THUMBNAIL_MAX = 256  # the OpenRaster spec's thumbnail bound
MAX_LAYER_NAME = 120  # keeps names within every editor's (and PSD's 255-byte legacy) limits
# What XML 1.0 cannot hold: a stack.xml with one of these does not parse (GIMP and Krita refuse the file).
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
ORA_NAMESPACE = "urn:layerdiff-jax:openraster"
ORA_GLOBAL_PROMPT = f"{{{ORA_NAMESPACE}}}global-prompt"  # attribute of <image>
ORA_PROMPT = f"{{{ORA_NAMESPACE}}}prompt"  # attribute of <layer>
ElementTree.register_namespace("layerdiff", ORA_NAMESPACE)


def layer_names(sample: LayeredSample) -> list[str]:
    """Names bottom to top: "background: <prompt>", "layer 01: <prompt>", ..."""
    names = [f"background: {sample.layer_prompts[0]}"]
    names += [f"layer {i:02d}: {p}" for i, p in enumerate(sample.layer_prompts[1:], start=1)]
    return [n if len(n) <= MAX_LAYER_NAME else n[: MAX_LAYER_NAME - 3] + "..." for n in names]


def layer_pixels(sample: LayeredSample) -> list[np.ndarray]:
    """RGBA uint8 (H, W, 4) per layer, bottom to top: the opaque background, then each foreground
    with its mask as alpha."""
    h, w = sample.size
    layers = [np.concatenate([sample.background, np.full((h, w, 1), 255, np.uint8)], axis=-1)]
    layers += [np.concatenate([fg, m[..., None]], axis=-1) for fg, m in zip(sample.foregrounds, sample.masks)]
    return layers


def _open_destination(dest: str | os.PathLike | BinaryIO) -> Path | BinaryIO:
    """A binary file object (an in-memory download) as it is; a path with its folder created."""
    if hasattr(dest, "write"):
        return dest
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_ora(sample: LayeredSample, dest: str | os.PathLike | BinaryIO) -> Path | BinaryIO:
    """An OpenRaster file at the path or binary file object `dest`: `mimetype` first and stored uncompressed,
    `stack.xml` listing the layers top first, `data/<layer>.png` RGBA, `mergedimage.png` (the composite) and
    `Thumbnails/thumbnail.png`."""
    where = ORA_FILE if hasattr(dest, "write") else Path(dest)
    h, w = sample.size
    names, pixels = layer_names(sample), layer_pixels(sample)
    # Prompts are checked on the way in (`check_prompt`); this keeps any sample's file valid.
    texts = [("layer name", n) for n in names] + [("layer prompt", p) for p in sample.layer_prompts]
    for what, text in texts + [("global prompt", sample.global_prompt)]:
        bad = _NOT_XML_CHAR.search(text)
        if bad:
            raise DataError(f"{where}: {what} {text!r} holds {ascii(bad.group())[1:-1]}, which XML cannot hold")
    sources = ["data/background.png"] + [f"data/{layer_file(i)}" for i in range(1, sample.num_layers)]
    image = ElementTree.Element("image", {"version": "0.0.6", "w": str(w), "h": str(h), "xres": "72", "yres": "72"})
    image.set(ORA_GLOBAL_PROMPT, sample.global_prompt)
    stack = ElementTree.SubElement(image, "stack")
    for name, prompt, src in reversed(list(zip(names, sample.layer_prompts, sources))):  # the topmost layer first
        attrs = {"name": name, "src": src, "x": "0", "y": "0", "opacity": "1.0", "visibility": "visible", "composite-op": "svg:src-over"}
        ElementTree.SubElement(stack, "layer", {**attrs, ORA_PROMPT: prompt})
    composite = PIL.Image.fromarray(sample.composite())
    thumbnail = composite.copy()
    thumbnail.thumbnail((ORA_THUMBNAIL_MAX, ORA_THUMBNAIL_MAX))
    target = _open_destination(dest)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo("mimetype"), ORA_MIMETYPE, compress_type=zipfile.ZIP_STORED)
        zf.writestr("stack.xml", ElementTree.tostring(image, encoding="utf-8", xml_declaration=True))
        for src, array in zip(sources, pixels):
            zf.writestr(src, png_bytes(array))
        zf.writestr("mergedimage.png", png_bytes(np.asarray(composite)))
        zf.writestr("Thumbnails/thumbnail.png", png_bytes(np.asarray(thumbnail)))
    return target


def legacy_layer_name(name: str) -> str:
    """The Pascal-string layer name older readers use: ASCII, anything else as "?"."""
    return name.encode("ascii", "replace").decode("ascii")


def write_psd(sample: LayeredSample, dest: str | os.PathLike | BinaryIO) -> Path | BinaryIO:
    """A layered RGB Photoshop file (psd-tools) at the path or binary file object `dest`: opaque background,
    foregrounds with alpha; psd-tools renders the merged preview from the layers."""
    h, w = sample.size
    psd = PSDImage.new("RGB", (w, h))
    for name, array in zip(layer_names(sample), layer_pixels(sample)):
        layer = psd.create_pixel_layer_from_array(array, name=legacy_layer_name(name))
        layer.tagged_blocks.set_data(Tag.UNICODE_LAYER_NAME, name)
    target = _open_destination(dest)
    psd.save(target)
    return target


_WRITERS = {"ora": (ORA_FILE, write_ora), "psd": (PSD_FILE, write_psd)}


def write_sample(sample: LayeredSample, folder: str | os.PathLike, formats: Sequence[str] = LAYERED_FORMATS) -> Path:
    """The exchange-format folder plus `layers.ora` / `layers.psd` for each of `formats`, written all at once.
    A layered file that cannot be written is left out and raised after as `ExtraFileError`."""
    unknown = sorted(set(formats) - set(LAYERED_FORMATS))
    if unknown:
        raise ValueError(f"unknown layered format(s) {unknown}; choose from {LAYERED_FORMATS}")
    return write_sample_folder(sample, folder, extras=dict(_WRITERS[f] for f in LAYERED_FORMATS if f in formats))


def _check_ora(ora: Path) -> None:
    """The zip reads back, `mimetype` is OpenRaster's, `stack.xml` parses and every layer's `src` is in the zip."""
    try:
        with zipfile.ZipFile(ora) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DataError(f"{ora}: {bad} in it is damaged")
            names = set(zf.namelist())
            mimetype = zf.read("mimetype") if "mimetype" in names else None
            stack = zf.read("stack.xml") if "stack.xml" in names else None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{ora}: not a readable OpenRaster file ({e})") from None
    if mimetype != ORA_MIMETYPE:
        raise DataError(f"{ora}: not an OpenRaster file (mimetype {mimetype!r}, expected {ORA_MIMETYPE!r})")
    if stack is None:
        raise DataError(f"{ora}: no stack.xml in it")
    try:  # expat fetches no external entities: the file is only parsed
        root = ElementTree.fromstring(stack)
    except ElementTree.ParseError as e:
        raise DataError(f"{ora}: its stack.xml is not valid XML ({e})") from None
    missing = [src for src in (layer.get("src") for layer in root.iter("layer")) if src not in names]
    if missing:
        raise DataError(f"{ora}: stack.xml names layer files that are not in it: {missing}")


def check_layered_files(folder: str | os.PathLike) -> None:
    """Raises DataError when a `layers.ora` or `layers.psd` in `folder` does not open (a truncated write) or,
    for OpenRaster, is not a valid one (`_check_ora`)."""
    folder = Path(folder)
    ora, psd = folder / ORA_FILE, folder / PSD_FILE
    if ora.exists():
        _check_ora(ora)
    if psd.exists():
        try:
            PSDImage.open(psd)
        except Exception as e:  # psd-tools raises assorted types on truncated files
            raise DataError(f"{psd}: not a readable Photoshop file ({type(e).__name__}: {e})") from None


def write_contact_sheet(samples: Sequence[LayeredSample], path: str | os.PathLike, cell: int = 128) -> Path:
    """One PNG with a row per sample (composite, background, foregrounds over a checkerboard)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(samples, cell=cell).save(path)
    return path
