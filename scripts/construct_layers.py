#!/usr/bin/env python
"""Turns images into layered training samples (paper §3.3, Appendix A.2).

  construct_layers.py --images DIR --out DIR --models models.yaml [--workers N] [--batch-size N]
  construct_layers.py --images SAMPLES_DIR --out DIR --oracle [--models models.yaml]

Writes one exchange-format sample folder per accepted image under --out, `summary.json` (images in,
samples out, rejections by reason, layers per sample) and `rejections.jsonl` (each rejected image and
why). Rerunning with the same --out resumes: finished images are not redone; --out is locked while a run
lasts (a second run on it is refused, naming the first). Build a dataset from the
result with `build_dataset.py folder --samples OUT --out TFDS_DIR`.

--oracle reads exchange-format sample folders (e.g. from `build_dataset.py export`) and takes their
ground truth instead of the models (see `layerdiff_jax.construction.oracle`); --models then only
supplies the run settings and rules. Model paths in models.yaml are local folders; nothing downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from layerdiff_jax.construction.build import build_stages
from layerdiff_jax.construction.config import load_config
from layerdiff_jax.construction.errors import ConstructionConfigError
from layerdiff_jax.construction.oracle import oracle_stages
from layerdiff_jax.construction.run import construct, image_source, oracle_source
from layerdiff_jax.data.layers import DataError
from layerdiff_jax.fileio import OutputFolderError, folder_lock


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="input images (or sample folders with --oracle)")
    parser.add_argument("--out", required=True, type=Path, help="output folder of sample folders")
    parser.add_argument("--models", type=Path, help="models YAML (required unless --oracle)")
    parser.add_argument("--workers", type=int, default=2, help="threads decoding images and writing samples")
    parser.add_argument("--batch-size", type=int, help="images per model batch (default: the YAML's, else 8)")
    parser.add_argument("--oracle", action="store_true", help="ground-truth stages on exchange-format sample folders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--workers and --batch-size must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every load is local_files_only
    try:
        if not args.oracle and args.models is None:
            raise ConstructionConfigError("--models is required (or --oracle)")
        if args.out.resolve().is_relative_to(args.images.resolve()):
            raise ConstructionConfigError(
                "--out must not be inside --images (a rerun would read the samples as inputs)"
            )
        config = load_config(args.models)
        if args.batch_size is not None:
            config = dataclasses.replace(config, batch_size=args.batch_size)
        if args.oracle:
            source, truth = oracle_source(args.images)
            stages = oracle_stages(truth, config.phrases.get("spacy_model"))
        else:
            source = image_source(args.images, config.max_side)
            stages = build_stages(config)
        with folder_lock(args.out, "construct_layers.py"):  # one run per --out: a second would redo the same images
            summary = construct(source, args.out, stages, config, workers=args.workers, progress=not args.no_progress)
    except (ConstructionConfigError, DataError, OutputFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
