"""Training metrics to TensorBoard (tensorboardX) and to `metrics.jsonl`, from the main process only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    """`write(step, {"loss": ...})` appends one JSON line and one TensorBoard scalar per metric;
    `write_image(step, name, hwc_uint8)` adds an image. A resumed run appends to the same files."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool):
        self.enabled = enabled
        self.jsonl_path = Path(workdir) / "metrics.jsonl"
        if enabled:
            self._tensorboard = SummaryWriter(os.fspath(Path(workdir) / "tensorboard"))
            self._jsonl = self.jsonl_path.open("a")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
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
