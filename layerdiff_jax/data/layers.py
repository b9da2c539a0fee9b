"""The layered sample: background + foreground layers with masks and prompts.

A sample has `K + 1` layers. Layer 0 is the full-frame background `B`; layers `1..K` are foregrounds
ordered deepest -> shallowest, each an RGB image `F_i` cut from the source image with a 5x5-dilated
mask, plus the undilated mask `m_i`. The composite is `x = m_b * B + sum_i m_i * F_i` with
`m_b = 1 - sum_i m_i`; `compose` computes it as back-to-front alpha "over", which is the same thing
when the masks do not overlap (training data) and stays well defined when they do (generated data).

The exchange format, one folder per sample (sampling writes the same layout):

    composite.png            RGB, for people to look at; derived from the layers when read
    background.png           RGB
    layer_01.png ...         RGBA: RGB = F_i, alpha = mask
    mask_01.png ...          8-bit grayscale mask m_i (255 = inside)
    sample.json              {"global_prompt", "layer_prompts": [bg, fg1, ...], "num_layers",
                              "size": [H, W], ...any extra metadata, kept on round-trip}

A folder is written under a staging name and renamed into place once every file is in it (sample.json
last), so a sample folder is either complete or absent (`fileio.staged_folder`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from layerdiff_jax.diffusion.settings import RequestError, check_prompt
from layerdiff_jax.fileio import check_finished, staged_folder

DILATION_KERNEL = 5
SAMPLE_JSON = "sample.json"
REQUIRED_JSON_FIELDS = ("global_prompt", "layer_prompts", "num_layers", "size")


class DataError(ValueError):
    """Bad layered data; the message names the offending file or field."""


class ExtraFileError(OSError):
    """Extra files of a sample folder (its layered files) could not be written; the folder was written without
    them. `failures` maps each file name to its exception."""

    def __init__(self, folder: Path, failures: dict[str, BaseException]):
        self.folder, self.failures = folder, failures
        what = "; ".join(f"{name} ({type(e).__name__}: {e})" for name, e in failures.items())
        super().__init__(f"{folder}: written without {what}")


@dataclasses.dataclass(eq=False)
class LayeredSample:
    """One layered image. Arrays are uint8 so that PNG storage round-trips exactly."""

    background: np.ndarray  # (H, W, 3) uint8
    foregrounds: np.ndarray  # (K, H, W, 3) uint8, deepest first, zero outside the dilated mask
    masks: np.ndarray  # (K, H, W) uint8, undilated, 255 = inside
    global_prompt: str
    layer_prompts: list[str]  # K + 1 prompts, background first
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.background.ndim != 3 or self.background.shape[-1] != 3:
            raise DataError(f"background must be (H, W, 3), got {self.background.shape}")
        h, w, _ = self.background.shape
        k = len(self.layer_prompts) - 1
        if k < 0:
            raise DataError("layer_prompts must hold at least the background prompt")
        if self.foregrounds.shape != (k, h, w, 3):
            raise DataError(
                f"foregrounds must be {(k, h, w, 3)} for {k + 1} layer prompts, got {self.foregrounds.shape}"
            )
        if self.masks.shape != (k, h, w):
            raise DataError(f"masks must be {(k, h, w)}, got {self.masks.shape}")
        for name in ("background", "foregrounds", "masks"):
            if getattr(self, name).dtype != np.uint8:
                raise DataError(f"{name} must be uint8, got {getattr(self, name).dtype}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_prompts)

    @property
    def size(self) -> tuple[int, int]:
        return self.background.shape[0], self.background.shape[1]

    def composite(self) -> np.ndarray:
        """The composed image, (H, W, 3) uint8."""
        x = compose(
            self.background.astype(np.float32),
            self.foregrounds.astype(np.float32),
            self.masks[..., None].astype(np.float32) / 255.0,
        )
        return np.clip(np.round(x), 0, 255).astype(np.uint8)


def compose(background, foregrounds, masks):
    """Composes layers back to front: `x = m_i * F_i + (1 - m_i) * x`, starting from `x = B`.

    background (..., H, W, C), foregrounds (..., K, H, W, C) deepest first, masks (..., K, H, W, 1) in
    [0, 1]. Uses only arithmetic, so numpy and jax arrays both work.
    """
    out = background
    for i in range(foregrounds.shape[-4]):
        m = masks[..., i, :, :, :]
        out = m * foregrounds[..., i, :, :, :] + (1 - m) * out
    return out


def background_mask(masks):
    """`m_b = 1 - sum_i m_i`, clipped to [0, 1] for overlapping (generated) masks.

    masks (..., K, H, W, 1) in [0, 1] -> (..., H, W, 1).
    """
    return np.clip(1.0 - np.sum(masks, axis=-4), 0.0, 1.0)


def dilate_mask(mask: np.ndarray, kernel_size: int = DILATION_KERNEL) -> np.ndarray:
    """Grey dilation (max filter) with a `kernel_size` square over the last two axes (H, W)."""
    r = kernel_size // 2
    pad = [(0, 0)] * (mask.ndim - 2) + [(r, r), (r, r)]
    padded = np.pad(mask, pad)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel_size, kernel_size), axis=(-2, -1))
    return windows.max(axis=(-2, -1))


def cut_foreground(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """F_i: `image` (H, W, 3) kept where the 5x5-dilated `mask` (H, W) is non-zero, the colour `fill` elsewhere
    (black by default). The mask hides the fill; it only decides what "nothing here" looks like to the VAE."""
    keep = dilate_mask(mask) > 0
    return np.where(keep[..., None], image, np.asarray(fill, image.dtype)).astype(image.dtype)


# ----------------------------------------------------------------------------- exchange folders


def layer_file(i: int) -> str:
    return f"layer_{i:02d}.png"


def mask_file(i: int) -> str:
    return f"mask_{i:02d}.png"


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def exchange_files(sample: LayeredSample, where: str | os.PathLike = "") -> dict[str, bytes]:
    """The files of `sample`'s exchange-format folder, {file name: content}, sample.json last; `where` names the
    folder in errors."""
    clash = sorted(set(sample.metadata) & set(REQUIRED_JSON_FIELDS))
    if clash:
        raise DataError(f"metadata keys {clash} clash with the fields of {SAMPLE_JSON}")
    info = {
        "global_prompt": sample.global_prompt,
        "layer_prompts": list(sample.layer_prompts),
        "num_layers": sample.num_layers,
        "size": list(sample.size),
        **sample.metadata,
    }
    try:  # NaN and infinity are not JSON: most readers refuse a file holding them
        text = json.dumps(info, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise DataError(f"{Path(where) / SAMPLE_JSON}: the metadata cannot be written as JSON ({e})") from None
    files = {"composite.png": png_bytes(sample.composite()), "background.png": png_bytes(sample.background)}
    for i, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        files[layer_file(i)] = png_bytes(np.concatenate([fg, mask[..., None]], axis=-1))
        files[mask_file(i)] = png_bytes(mask)
    files[SAMPLE_JSON] = text.encode("utf-8")
    return files


def write_sample_folder(
    sample: LayeredSample,
    folder: str | os.PathLike,
    extras: Mapping[str, Callable[[LayeredSample, Path], Any]] | None = None,
) -> Path:
    """Writes `sample` in the exchange format to `folder`, replacing a folder there, all at once (see above).

    `extras` {file name: writer(sample, path)} adds files, written after the images and before sample.json.
    An extra that fails is left out and the rest of the folder is still written; then ExtraFileError names
    what failed.
    """
    folder = Path(folder)
    files = exchange_files(sample, folder)
    info = files.pop(SAMPLE_JSON)
    failures: dict[str, BaseException] = {}
    with staged_folder(folder) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        for name, write in (extras or {}).items():
            try:
                write(sample, staging / name)
            except Exception as e:  # one format's failure must not lose the sample or the other formats
                (staging / name).unlink(missing_ok=True)
                failures[name] = e
        (staging / SAMPLE_JSON).write_bytes(info)
    if failures:
        raise ExtraFileError(folder, failures)
    return folder


# 16-bit gray as PIL opens it ("I": older Pillow, TIFF). PIL's convert() clips these to 8 bits instead of
# scaling them: a 46% mask would read as 100%.
_DEEP_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_DEEP_MAX = 65535
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})


def _deep_gray_to_8bit(img: PIL.Image.Image, name: str | os.PathLike) -> PIL.Image.Image:
    """16-bit gray scaled to 8-bit "L" (65535 -> 255, rounded); "LA" when the file marks a gray value transparent."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > _DEEP_MAX):
        raise DataError(f"{name}: mode {img.mode} with values outside 0..{_DEEP_MAX}; only 8- and 16-bit images are read")
    gray = np.round(values * (255 / _DEEP_MAX)).astype(np.uint8)
    if "transparency" not in img.info:
        return PIL.Image.fromarray(gray)
    alpha = np.where(values == img.info["transparency"], 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.stack([gray, alpha], axis=-1))


def image_array(img: PIL.Image.Image, mode: str, name: str | os.PathLike) -> np.ndarray:
    """`img`, in any mode PIL opens, as 8-bit "RGB" colour (H, W, 3), an "L" mask (H, W) or "RGBA" colour with
    its transparency as alpha (H, W, 4; the layers of layered files); DataError naming `name` when it cannot be
    read.

    16-bit gray is scaled (65535 -> 255, rounded), where PIL's convert() would clip it; Pillow opens 16-bit
    colour PNGs as 8-bit already (their high byte: within 1 of scaling). Float ("F") images are refused: their
    range is unknown. Colour ignores transparency: a layer's colour beyond its mask is kept as stored. A mask is
    the gray value (ITU-R 601 luma, as PIL converts colour) composited over black: 255 = inside, and a
    transparent pixel (alpha channel, palette or gray-value transparency) is outside. The project's own masks
    are 8-bit "L" and read unchanged.
    """
    if img.mode == "F":
        raise DataError(f"{name}: mode F (floating point) images are not read; store it as 8- or 16-bit integers")
    if img.mode in _DEEP_GRAY_MODES:
        img = _deep_gray_to_8bit(img, name)
    try:
        if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
            return np.asarray(img.convert(mode))
        rgba = np.asarray(img.convert("RGBA"))  # PIL reads palette and gray-value transparency only via RGBA
        if mode in ("RGB", "RGBA"):
            return rgba[..., : len(mode)]
        gray, alpha = np.moveaxis(np.asarray(PIL.Image.fromarray(rgba).convert("LA"), np.uint32), -1, 0)
        return ((gray * alpha + 127) // 255).astype(np.uint8)
    except ValueError as e:  # convert() has no conversion from this mode
        raise DataError(f"{name}: mode {img.mode} cannot be read as {mode} ({e})") from None


_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


def decode_image(data: bytes, mode: str, name: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file's bytes as `image_array` reads them; DataError naming `name` when they do not decode or the
    mode is not read. Given `size` (H, W, as sample.json says), another size is refused before decoding."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            if size is not None and (img.height, img.width) != tuple(size):
                raise DataError(f"{name}: size {img.height}x{img.width} but {SAMPLE_JSON} says {size[0]}x{size[1]}")
            img.load()
            return image_array(img, mode, name)
    except DataError:
        raise
    except _IMAGE_ERRORS as e:
        raise DataError(f"{name}: not a readable image ({e})") from None


def _file_bytes(path: Path) -> bytes | None:
    """The file's content, None when there is no file."""
    if not path.is_file():
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_image(path: str | os.PathLike, mode: str) -> np.ndarray:
    """The image file at `path` as `image_array` reads it ("RGB" colour or "L" mask, uint8); DataError naming
    the file when it is missing, does not decode or has a mode that is not read."""
    path = Path(path)
    data = _file_bytes(path)
    if data is None:
        raise DataError(f"{path}: missing")
    return decode_image(data, mode, path)


def _read_sample_json(data: bytes | None, path: Path) -> dict[str, Any]:
    if data is None:
        raise DataError(f"{path}: missing")
    try:
        info = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an over-long number, nesting too deep
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_JSON_FIELDS if k not in info]
    if missing:
        raise DataError(f"{path}: missing field(s) {missing}")
    prompts, n, size = info["layer_prompts"], info["num_layers"], info["size"]
    if not isinstance(info["global_prompt"], str):
        raise DataError(f"{path}: global_prompt must be a string")
    if not isinstance(n, int) or n < 1:
        raise DataError(f"{path}: num_layers must be an integer >= 1, got {n!r}")
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)) or len(prompts) != n:
        raise DataError(f"{path}: layer_prompts must be a list of {n} strings (num_layers), got {prompts!r}")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise DataError(f"{path}: size must be [H, W], got {size!r}")
    try:
        check_prompt("global_prompt", info["global_prompt"])
        for i, prompt in enumerate(prompts):
            check_prompt(f"layer_prompts[{i}]", prompt)
    except RequestError as e:
        raise DataError(f"{path}: {e}") from None
    return info


def read_sample_files(
    read: Callable[[str], bytes | None], where: str | os.PathLike, *, max_layers: int | None = None
) -> LayeredSample:
    """Parses one exchange-format sample from `read(file name)`, the file's bytes or None when it is missing (a
    folder's files, an uploaded zip's members); any problem raises `DataError` naming the file as `where/<file>`.
    A sample of more than `max_layers` layers is refused before any image is read."""
    where = Path(where)
    info = _read_sample_json(read(SAMPLE_JSON), where / SAMPLE_JSON)
    if max_layers is not None and info["num_layers"] > max_layers:
        raise DataError(f"{where / SAMPLE_JSON}: {info['num_layers']} layers, over the limit of {max_layers}")
    size = tuple(info["size"])

    def image(file: str, mode: str) -> np.ndarray:
        data = read(file)
        if data is None:
            raise DataError(f"{where / file}: missing")
        return decode_image(data, mode, where / file, size)

    k = info["num_layers"] - 1
    background = image("background.png", "RGB")
    foregrounds = np.zeros((k, *size, 3), np.uint8)
    masks = np.zeros((k, *size), np.uint8)
    for i in range(1, k + 1):
        foregrounds[i - 1] = image(layer_file(i), "RGB")
        masks[i - 1] = image(mask_file(i), "L")
    composite = read("composite.png")
    if composite is not None:  # derived, but a broken one is still worth reporting
        decode_image(composite, "RGB", where / "composite.png", size)
    metadata = {k_: v for k_, v in info.items() if k_ not in REQUIRED_JSON_FIELDS}
    return LayeredSample(background, foregrounds, masks, info["global_prompt"], info["layer_prompts"], metadata)


def read_sample_folder(folder: str | os.PathLike) -> LayeredSample:
    """Reads one exchange-format folder; any problem raises `DataError` naming the file."""
    folder = Path(folder)
    check_finished(folder)  # an edit's output folder records its run
    return read_sample_files(lambda name: _file_bytes(folder / name), folder)


def list_sample_folders(root: str | os.PathLike) -> list[Path]:
    """The sample folders directly under `root` (every non-hidden subdirectory), sorted by name. A run that
    recorded not finishing (`fileio.check_finished`) is refused: its samples are not the whole run."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    check_finished(root)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
