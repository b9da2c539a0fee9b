"""A contact sheet of layered samples: one row per sample, composite | background | foreground layers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

from layerdiff_jax.data.layers import LayeredSample

_CAPTION_HEIGHT = 14
_PAD = 4
_BACKDROP = (255, 255, 255)


def _checkerboard(size: int, square: int = 8) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] // square
    return np.where(((y + x) % 2 == 0)[..., None], 175, 135).astype(np.uint8).repeat(3, axis=-1)


def _cell(rgb: np.ndarray, cell: int, alpha: np.ndarray | None = None) -> PIL.Image.Image:
    """`rgb` scaled to `cell`; with `alpha`, shown over a checkerboard so the mask is visible."""
    img = PIL.Image.fromarray(rgb).resize((cell, cell), PIL.Image.Resampling.NEAREST)
    if alpha is None:
        return img
    a = PIL.Image.fromarray(alpha).resize((cell, cell), PIL.Image.Resampling.NEAREST)
    return PIL.Image.composite(img, PIL.Image.fromarray(_checkerboard(cell)), a)


def sample_grid(samples: Sequence[LayeredSample], cell: int = 128) -> PIL.Image.Image:
    """Rows of composite, background and each foreground (alpha = mask), captioned with the prompts."""
    columns = 2 + max(s.num_layers - 1 for s in samples)
    row_h = _CAPTION_HEIGHT + cell + _CAPTION_HEIGHT
    sheet = PIL.Image.new("RGB", (_PAD + columns * (cell + _PAD), _PAD + len(samples) * (row_h + _PAD)), _BACKDROP)
    draw = PIL.ImageDraw.Draw(sheet)
    for r, s in enumerate(samples):
        top = _PAD + r * (row_h + _PAD)
        draw.text((_PAD, top), s.global_prompt, fill=(0, 0, 0))
        cells = [_cell(s.composite(), cell), _cell(s.background, cell)]
        cells += [_cell(fg, cell, alpha=m) for fg, m in zip(s.foregrounds, s.masks)]
        for c, (img, caption) in enumerate(zip(cells, ["composite", *s.layer_prompts])):
            left = _PAD + c * (cell + _PAD)
            sheet.paste(img, (left, top + _CAPTION_HEIGHT))
            draw.text((left, top + _CAPTION_HEIGHT + cell + 1), caption, fill=(60, 60, 60))
    return sheet
