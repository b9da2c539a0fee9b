#!/usr/bin/env python
"""The main job, end to end on CPU: data -> the toy base -> LayerDiff fine-tuning -> sampling -> evaluation.

  python scripts/demo.py [--config configs/demo.py] [--config.<field>=<value> ...]

Everything lands under the config's out_dir (outputs/demo/): data/, step0/ (LayerDiff before fine-tuning,
sampled and scored), train/ (checkpoints, metrics, the fine-tuned model folder train/model/), samples/ (one
exchange-format folder per sample, contact_sheet.png), metrics.json. A rerun reuses finished stages (dataset,
step-0 scores, training checkpoints) and redoes the rest. The stages are `layerdiff_jax.demo.run`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent.parent / "configs" / "demo.py"), "demo config", lock_config=True
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO

    from layerdiff_jax.demo import run
    from layerdiff_jax.training.config import ConfigError

    try:
        run(_CONFIG.value)
    except ConfigError as e:
        print(f"bad config: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    app.run(lambda argv: sys.exit(main(argv)))
