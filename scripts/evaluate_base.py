#!/usr/bin/env python
"""Scores a text-to-image SD folder (the toy base) on held-out prompts of the synthetic world.

  evaluate_base.py MODEL_DIR [--count 48] [--guidance 1,3,5] [--steps 25] [--out base_metrics.json]

Generates one image per held-out prompt ("a red circle on a blue background", and composites with 2 and 3
objects), scores object colour, object shape and background colour (layerdiff_jax/evaluation/text_to_image.py),
prints a table per guidance scale and writes the numbers to --out and the images as contact sheets beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="an SD folder (vae/, text_encoder/, unet/, tokenizer/)")
    p.add_argument("--count", type=int, default=48, help="prompts per set (single objects, composites)")
    p.add_argument("--guidance", default="3", help="comma-separated classifier-free guidance scales")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("base_metrics.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        guidances = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        print(f"--guidance {args.guidance!r}: expected numbers separated by commas", file=sys.stderr)
        return 2
    if args.count < 1 or args.steps < 1:
        print("--count and --steps must be >= 1", file=sys.stderr)
        return 2
    from layerdiff_jax.evaluation.text_to_image import evaluate_base, format_base_table
    from layerdiff_jax.sampling.text_to_image import TextToImagePipeline

    try:
        pipeline = TextToImagePipeline.load(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, images = evaluate_base(pipeline, count=args.count, guidances=guidances, steps=args.steps, seed=args.seed, size=args.size)
    print(format_base_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "steps": args.steps, "results": results}, indent=2) + "\n")
    for name, batch in images.items():
        rows = [np.concatenate(list(batch[i : i + 16]), axis=1) for i in range(0, len(batch) - len(batch) % 16 or 16, 16)]
        sheet = args.out.with_name(f"{args.out.stem}_{name.replace(' ', '_').replace(',', '')}.png")
        PIL.Image.fromarray(np.concatenate(rows, axis=0)).save(sheet)
    print(f"wrote {args.out} and its contact sheets")
    return 0


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    sys.exit(main())
