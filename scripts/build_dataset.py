#!/usr/bin/env python
"""Builds layered datasets (tfds, array_record) and writes synthetic samples for inspection.

  build_dataset.py synthetic --out DIR --num-train N --num-test M [--resolution 64] [--seed 0]
                             [--layer-mix 2:0.34,3:0.33,4:0.33]
  build_dataset.py folder --samples DIR --out DIR [--skip-bad] [--name NAME]
  build_dataset.py export --out DIR --num N [--resolution 64] [--seed 0] [--layer-mix ...]
  build_dataset.py grid --out docs/images/synthetic_samples.png [--num 4] [--resolution 160] [--seed 0]

`synthetic` and `folder` write a tfds dataset folder (printed at the end) that
`layerdiff_jax.data.loader.make_dataloader` reads. `export` writes exchange-format sample folders
(what sampling writes and `folder` reads); `grid` writes a contact sheet of synthetic samples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from layerdiff_jax.data.layers import DataError, write_sample_folder
from layerdiff_jax.data.synthetic import DEFAULT_LAYER_MIX, generate_sample, parse_layer_mix
from layerdiff_jax.data.tfds_builders import build_from_folders, build_synthetic, split_sizes
from layerdiff_jax.data.visualize import sample_grid


def _add_synthetic_args(p: argparse.ArgumentParser, resolution: int) -> None:
    p.add_argument("--resolution", type=int, default=resolution, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layer-mix",
        type=parse_layer_mix,
        default=DEFAULT_LAYER_MIX,
        help="total layers (background included) and their weights, e.g. 2:0.34,3:0.33,4:0.33",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="build the procedural dataset")
    p.add_argument("--out", required=True, type=Path, help="tfds data dir")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-test", type=int, default=100)
    _add_synthetic_args(p, resolution=64)

    p = sub.add_parser("folder", help="build from a folder of exchange-format sample folders")
    p.add_argument("--samples", required=True, type=Path, help="folder of sample folders (or of train/ test/)")
    p.add_argument("--out", required=True, type=Path, help="tfds data dir")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples and list them")
    p.add_argument("--name", help="dataset config name (default: the samples folder's name)")

    p = sub.add_parser("export", help="write synthetic samples as exchange-format folders")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num", type=int, default=16)
    _add_synthetic_args(p, resolution=64)

    p = sub.add_parser("grid", help="write a contact sheet of synthetic samples")
    p.add_argument("--out", type=Path, default=Path("docs/images/synthetic_samples.png"))
    p.add_argument("--num", type=int, default=4)
    _add_synthetic_args(p, resolution=160)
    return parser


def _print_built(path: Path) -> None:
    print(f"dataset: {path}")
    print("examples: " + ", ".join(f"{split} {n}" for split, n in split_sizes(path).items()))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "synthetic":
        _print_built(build_synthetic(
            args.out,
            num_train=args.num_train,
            num_test=args.num_test,
            resolution=args.resolution,
            seed=args.seed,
            layer_mix=args.layer_mix,
        ))
    elif args.command == "folder":
        try:
            path, skipped = build_from_folders(args.samples, args.out, skip_bad=args.skip_bad, name=args.name)
        except DataError as e:
            print(f"error: {e}" + ("" if args.skip_bad else "\n(use --skip-bad to skip bad samples)"), file=sys.stderr)
            return 1
        _print_built(path)
        print(f"skipped: {len(skipped)}")
        for _, reason in skipped:
            print(f"  {reason}")
    elif args.command == "export":
        for index in tqdm(range(args.num), desc="samples"):
            sample = generate_sample(args.seed, index, args.resolution, args.layer_mix)
            write_sample_folder(sample, args.out / f"sample_{index:05d}")
        print(f"wrote {args.num} sample folders to {args.out}")
    elif args.command == "grid":
        samples = [generate_sample(args.seed, i, args.resolution, args.layer_mix) for i in range(args.num)]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(samples, cell=args.resolution).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
