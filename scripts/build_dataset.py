#!/usr/bin/env python
"""Builds layered datasets (tfds, array_record) and writes synthetic samples for inspection.

  build_dataset.py synthetic --out DIR --num-train N --num-test M [--resolution 64] [--seed 0]
                             [--layer-mix 2:0.34,3:0.33,4:0.33] [--foreground-fill black|contrast]
  build_dataset.py folder --samples DIR --out DIR [--skip-bad] [--name NAME]
  build_dataset.py export --out DIR --num N [--resolution 64] [--seed 0] [--layer-mix ...] [--overwrite]
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

from layerdiff_jax.cli import bad_samples, int_in, interrupted
from layerdiff_jax.data.layers import DataError, write_sample_folder
from layerdiff_jax.data.synthetic import DEFAULT_LAYER_MIX, FOREGROUND_FILLS, generate_sample, parse_layer_mix
from layerdiff_jax.data.tfds_builders import build_from_folders, build_synthetic, split_sizes
from layerdiff_jax.data.visualize import sample_grid
from layerdiff_jax.fileio import OutputFolderError, claim_output_folder


# The synthetic world draws shapes of 25-45% of the side, 2 px apart: at 16 px they are 4-7 px, the least that
# tells a circle from a square and still fits 3 of them; 1024 px is twice SD's 512, and larger ones are slow to
# draw. The multiple a model needs (its VAE's factor x its UNet's downsampling) is checked by training, which
# knows the model.
RESOLUTION = int_in(16, 1024, "(image side in pixels: smaller shapes cannot be told apart, larger are slow to draw)")
# A million samples is more than any toy run uses; more is a typo.
NUM_SAMPLES = 1_000_000
GRID_ROWS = 64  # a contact sheet to look at: one row of cells per sample


class _Parser(argparse.ArgumentParser):
    """Checks what no single argument's type can: a synthetic dataset has a sample in some split."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.command == "synthetic" and parsed.num_train + parsed.num_test < 1:
            self.error("synthetic: --num-train and --num-test are both 0: the dataset would be empty")
        return parsed


def _add_synthetic_args(p: argparse.ArgumentParser, resolution: int) -> None:
    p.add_argument("--resolution", type=RESOLUTION, default=resolution, help="image side in pixels")
    p.add_argument("--seed", type=int_in(0, why="(numpy's seeds are non-negative)"), default=0)
    p.add_argument(
        "--layer-mix",
        type=parse_layer_mix,
        default=DEFAULT_LAYER_MIX,
        help="total layers (background included) and their weights, e.g. 2:0.34,3:0.33,4:0.33",
    )
    p.add_argument(
        "--foreground-fill",
        choices=FOREGROUND_FILLS,
        default="black",
        help="a foreground layer outside its object (its mask hides it): black, or white behind dark objects (contrast)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="build the procedural dataset")
    p.add_argument("--out", required=True, type=Path, help="tfds data dir")
    split_size = int_in(0, NUM_SAMPLES, "(samples of the split)")
    p.add_argument("--num-train", type=split_size, default=1000)
    p.add_argument("--num-test", type=split_size, default=100)
    _add_synthetic_args(p, resolution=64)

    p = sub.add_parser("folder", help="build from a folder of exchange-format sample folders")
    p.add_argument("--samples", required=True, type=Path, help="folder of sample folders (or of train/ test/)")
    p.add_argument("--out", required=True, type=Path, help="tfds data dir")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples and list them")
    p.add_argument("--name", help="dataset config name (default: the samples folder's name)")

    p = sub.add_parser("export", help="write synthetic samples as exchange-format folders")
    p.add_argument("--out", required=True, type=Path, help="folder of sample folders (created; must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (nothing else there is deleted)")
    p.add_argument("--num", type=int_in(1, NUM_SAMPLES, "(sample folders to write)"), default=16)
    _add_synthetic_args(p, resolution=64)

    p = sub.add_parser("grid", help="write a contact sheet of synthetic samples")
    p.add_argument("--out", type=Path, default=Path("docs/images/synthetic_samples.png"))
    p.add_argument("--num", type=int_in(1, GRID_ROWS, "(rows of the sheet, one per sample)"), default=4)
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
            foreground_fill=args.foreground_fill,
        ))
    elif args.command == "folder":
        try:
            path, skipped = build_from_folders(args.samples, args.out, skip_bad=args.skip_bad, name=args.name)
        except DataError as e:
            return bad_samples(e, args.skip_bad, "bad samples")
        except OutputFolderError as e:  # --samples is an unfinished run
            print(f"error: {e}", file=sys.stderr)
            return 1
        _print_built(path)
        print(f"skipped: {len(skipped)}")
        for _, reason in skipped:
            print(f"  {reason}")
    elif args.command == "export":
        written = 0
        try:
            with claim_output_folder(args.out, tool="build_dataset.py export", overwrite=args.overwrite) as record:
                for index in tqdm(range(args.num), desc="samples"):
                    sample = generate_sample(args.seed, index, args.resolution, args.layer_mix, foreground_fill=args.foreground_fill)
                    name = f"sample_{index:05d}"
                    record.add(name)
                    write_sample_folder(sample, args.out / name)
                    written += 1
                record.finish()
        except OSError as e:  # the folder's lock, entries it did not write, a full disk
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return interrupted("", written, "sample folder(s)", args.out)
        print(f"wrote {written} sample folders to {args.out}")
    elif args.command == "grid":
        samples = [
            generate_sample(args.seed, i, args.resolution, args.layer_mix, foreground_fill=args.foreground_fill)
            for i in range(args.num)
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(samples, cell=args.resolution).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
