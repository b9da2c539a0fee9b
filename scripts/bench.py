"""Benchmark layerdiff_jax against the PyTorch reference (diffusers) and print one table.

  python scripts/bench.py                  # CPU: mid-size SD-structure UNet, small SD pipeline, float32
  python scripts/bench.py --device gpu     # GPU: SD-1.5 sizes, bfloat16, cuDNN attention, torch with SDPA
  python scripts/bench.py --quick          # toy sizes: a smoke test that runs in well under a minute

Rows: (1) UNet forward and forward+backward, ours vs diffusers' torch UNet with the same config and weights;
(2) 50-step DDIM text-to-image with classifier-free guidance, ours (one jitted program) vs diffusers'
StableDiffusionPipeline on the same weights; (3) the LayerDiff training step at L = 2, 3, 4, 8 layers;
with each, memory per step and (on accelerators) FLOPs and MFU. Times are medians of warm calls; compile
time is a separate column. The table is Markdown; --json writes every number (default under bench_results/).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DESCRIPTION = __doc__.split("\n\n")[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where both sides run (default cpu)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and 2 repeats: checks that every row runs")
    parser.add_argument("--json", type=Path, help="where to write the results (default bench_results/bench_<device>[_quick].json)")
    parser.add_argument("--rows", default="unet,ddim,layers", help="comma-separated subset of unet,ddim,layers (default: all)")
    parser.add_argument("--attention-impl", choices=["xla", "cudnn", "splash"], help="attention kernel (default: xla on CPU, cudnn on GPU)")
    parser.add_argument("--repeats", type=int, help="timed warm calls per measurement (default 5 on CPU, 10 on GPU, 2 with --quick)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.device == "gpu":  # JAX and torch share the GPU: no grabbing 75% of it up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")  # before any backend starts: the CPU even beside a GPU

    import dataclasses

    from layerdiff_jax.bench.report import format_table, write_json
    from layerdiff_jax.bench.suite import BenchSettings, run_suite

    if args.device == "gpu" and jax.devices()[0].platform != "gpu":
        print(f"--device gpu: JAX has no GPU here (backend {jax.devices()[0].platform})", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print(f"--repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    settings = BenchSettings.for_device(args.device, quick=args.quick, attention_impl=args.attention_impl)
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    try:
        result = run_suite(settings, rows)
    except ValueError as error:
        print(f"bench.py: {error}", file=sys.stderr)
        return 2
    json_path = args.json or Path("bench_results") / f"bench_{args.device}{'_quick' if args.quick else ''}.json"
    write_json(result, json_path)
    print(format_table(result))
    print(f"\nresults written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
