#!/usr/bin/env python
"""Evaluates layered samples (exchange-format folders, as sampling and `build_dataset.py export` write).

  evaluate.py SAMPLES_DIR [--out metrics.json] [--reference DIR] [--inception PATH] [--clip DIR]
              [--batch-size 32] [--skip-bad]

Prints a table per layer count (and overall) of prompt following for the synthetic vocabulary
(layer colour, shape, background colour), mask quality (clean, non-empty), FID and CLIP score, and
writes every number, per-sample details and the rules' thresholds to --out. FID needs --inception
(a local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth) and --reference (sample
folders or a folder of images); CLIP score needs --clip (a local transformers CLIP checkpoint folder).
Without them those metrics are reported as skipped. An incomplete sample folder (a write that did not
finish, a layered file cut short) stops the evaluation, naming it; --skip-bad skips and lists it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerdiff_jax.cli import bad_samples, int_in
from layerdiff_jax.convert.core import ConversionError
from layerdiff_jax.data.layers import DataError
from layerdiff_jax.evaluation.report import evaluate_samples, format_table
from layerdiff_jax.fileio import output_folder_problem


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", type=Path, help="folder of sample folders")
    p.add_argument("--out", type=Path, default=Path("metrics.json"), help="metrics JSON to write")
    p.add_argument("--reference", type=Path, help="real images for FID: sample folders or PNG/JPEG files")
    p.add_argument("--inception", type=Path, help="FID Inception weights (.pth or .safetensors)")
    p.add_argument("--clip", type=Path, help="transformers CLIP checkpoint folder")
    p.add_argument("--batch-size", type=int_in(1), default=32, help="images per Inception / CLIP batch")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable sample folders and list them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for flag, path, want_dir in (("--inception", args.inception, False), ("--clip", args.clip, True)):
        if path is not None and not (path.is_dir() if want_dir else path.is_file()):
            print(f"error: {flag} {path}: no such {'folder' if want_dir else 'file'}", file=sys.stderr)
            return 1
    problem = f"{args.out} is a folder" if args.out.is_dir() else output_folder_problem(args.out.parent, overwrite=True)
    if problem:  # found now, not after the metrics are computed
        print(f"error: --out {problem}", file=sys.stderr)
        return 1
    try:
        metrics = evaluate_samples(
            args.samples,
            reference=args.reference,
            inception=args.inception,
            clip=args.clip,
            batch_size=args.batch_size,
            skip_bad=args.skip_bad,
        )
    except DataError as e:
        return bad_samples(e, args.skip_bad, "unreadable sample folders")
    except (ConversionError, ValueError, OSError, ImportError) as e:  # OSError: also an unfinished run's folder
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(metrics))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
