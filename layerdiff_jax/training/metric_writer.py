"""Training metrics to TensorBoard (tensorboardX) and to `metrics.jsonl`, from the main process only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from tensorboardX import SummaryWriter


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a row cut short by a killed run (dropped with the redone steps)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricWriter:
    """`write(step, {"loss": ...})` appends one JSON line and one TensorBoard scalar per metric;
    `write_image(step, name, hwc_uint8)` adds an image.

    A resumed run appends to the same files. It redoes the steps after its checkpoint, so on its first
    write the rows an earlier run logged for that step and later ones are dropped from `metrics.jsonl`
    (one row per step; TensorBoard's event files keep both)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool):
        self.enabled = enabled
        self.jsonl_path = Path(workdir) / "metrics.jsonl"
        self._first_write = True
        if enabled:
            self._tensorboard = SummaryWriter(os.fspath(Path(workdir) / "tensorboard"))
            self._jsonl = self.jsonl_path.open("a")

    def _drop_rows_from(self, step: int) -> None:
        """Rewrites metrics.jsonl without the rows of `step` and later (replaced at once, never half written)."""
        lines = self.jsonl_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _row_step(line) < step]
        if len(kept) == len(lines):
            return
        self._jsonl.close()
        staging = self.jsonl_path.with_name(self.jsonl_path.name + ".partial")
        staging.write_text("".join(kept))
        os.replace(staging, self.jsonl_path)
        self._jsonl = self.jsonl_path.open("a")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if self._first_write:
            self._first_write = False
            self._drop_rows_from(step)
        values = {key: float(value) for key, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tensorboard.add_image(name, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl; none when it has not written one."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
