"""A weight-free inpainter, for the oracle mode and for runs without an SD inpainting checkpoint.

`ShiftFillInpainter` fills a hole by copying along the image's own best translations: it scores every
shift (dy, dx) up to `max_shift` by the mean squared difference between the known pixels and their
shifted copies (all shifts at once, with FFT cross-correlations), then fills each hole pixel from the
nearest known pixel along the best shifts, trying them in order. Plain, striped, checked and tiled
backgrounds (the synthetic dataset's) are reproduced exactly; on photographs it streaks the
surroundings into the hole, which is why real runs use SD inpainting. Pixels no shift reaches are
filled by diffusion (repeated averaging of filled 4-neighbours).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from layerdiff_jax.construction.stages import Frame

_TIE = 1e-3  # mean squared differences closer than this count as equal; the shorter shift wins


def best_shifts(
    image: np.ndarray, known: np.ndarray, max_shift: int, count: int, min_overlap: float = 0.25
) -> list[tuple[int, int]]:
    """The `count` translations under which the known pixels best match themselves, best first.

    image (H, W, C), known (H, W) bool. A shift is scored only where at least `min_overlap` of the
    known pixels land on known pixels; (dy, dx) and (-dy, -dx) score the same, only one is returned.
    """
    h, w = known.shape
    ph, pw = 2 * h, 2 * w  # zero padding makes the FFT correlation linear, not circular
    m = known.astype(np.float64)
    x = image.astype(np.float64) * m[..., None]

    def fft(a):
        return np.fft.rfft2(a, s=(ph, pw), axes=(0, 1))

    def corr(fa, fb):  # corr(a, b)[s] = sum_p a[p] * b[p + s]
        return np.fft.irfft2(np.conj(fa) * fb, s=(ph, pw), axes=(0, 1))

    fm, fx, fx2 = fft(m), fft(x), fft(x * x)
    overlap = corr(fm, fm)
    err = (corr(fx2, fm[..., None]) + corr(fm[..., None], fx2) - 2 * corr(fx, fx)).sum(-1)

    r = min(max_shift, h - 1, w - 1)
    dy, dx = np.mgrid[-r : r + 1, 0 : r + 1]  # half plane: the other half mirrors it
    half = (dx > 0) | ((dx == 0) & (dy > 0))
    dy, dx = dy[half], dx[half]
    ov = overlap[dy % ph, dx % pw]
    valid = ov >= min_overlap * max(m.sum(), 1.0)
    if not valid.any():
        return []
    dy, dx = dy[valid], dx[valid]
    mse = np.maximum(err[dy % ph, dx % pw], 0) / ov[valid]
    order = np.lexsort((dy**2 + dx**2, np.round(mse / _TIE)))
    return [(int(dy[i]), int(dx[i])) for i in order[:count]]


def _diffusion_fill(out: np.ndarray, pending: np.ndarray) -> None:
    """Fills `pending` pixels of `out` (float, in place) ring by ring with the mean of their filled
    4-neighbours."""
    pending = pending.copy()
    while pending.any():
        filled = np.pad(~pending, 1)
        values = np.pad(out * (~pending)[..., None], ((1, 1), (1, 1), (0, 0)))
        total = np.zeros_like(out)
        count = np.zeros(pending.shape)
        for sy, sx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            sl = (slice(sy, sy + pending.shape[0]), slice(sx, sx + pending.shape[1]))
            total += values[sl]
            count += filled[sl]
        ring = pending & (count > 0)
        if not ring.any():  # nothing known at all
            return
        out[ring] = total[ring] / count[ring][:, None]
        pending &= ~ring


def shift_fill(image: np.ndarray, hole: np.ndarray, max_shift: int = 64, num_shifts: int = 8) -> np.ndarray:
    """image (H, W, 3) uint8 with hole (H, W) bool -> a filled copy (pixels outside the hole unchanged)."""
    known = ~hole
    out = image.astype(np.float64)
    ys, xs = np.nonzero(hole)
    h, w = hole.shape
    for dy, dx in best_shifts(image, known, max_shift, num_shifts):
        steps = max(h, w) // max(abs(dy), abs(dx))
        for k in range(1, steps + 1):
            for sign in (1, -1):
                sy, sx = ys + sign * k * dy, xs + sign * k * dx
                inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
                ok = inside.copy()
                ok[inside] = known[sy[inside], sx[inside]]
                out[ys[ok], xs[ok]] = image[sy[ok], sx[ok]]
                ys, xs = ys[~ok], xs[~ok]
            if not len(ys):
                return out.astype(np.uint8)
    pending = np.zeros_like(hole)
    pending[ys, xs] = True
    _diffusion_fill(out, pending)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


class ShiftFillInpainter:
    """The `Inpainter` stage on `shift_fill`; negative prompts are ignored."""

    def __init__(self, max_shift: int = 64, num_shifts: int = 8):
        self.max_shift = max_shift
        self.num_shifts = num_shifts

    def inpaint(
        self, frames: Sequence[Frame], holes: Sequence[np.ndarray], negative_prompts: Sequence[str]
    ) -> list[np.ndarray]:
        return [shift_fill(f.image, hole, self.max_shift, self.num_shifts) for f, hole in zip(frames, holes)]
