"""Benchmark layerdiff_jax against the PyTorch reference (diffusers) and print one table.

  python scripts/bench.py                  # CPU: mid-size SD-structure UNet, small SD pipeline, float32
  python scripts/bench.py --device gpu     # GPU: SD-1.5 sizes, bfloat16, cuDNN attention, torch with SDPA
  python scripts/bench.py --quick          # toy sizes: a smoke test that runs in well under a minute
  python scripts/bench.py --device gpu --suite check --out DIR     # the accelerator check, at most 8 minutes
  python scripts/bench.py --device cpu --suite check --quick --out DIR   # its CPU path (toy sizes; the tests)
  python scripts/bench.py --suite profile  # CPU: where a UNet forward+backward's time goes, ours vs torch
  python scripts/bench.py --suite studio --checkpoint outputs/demo/train/model   # the layer studio's latencies

The standard suite's rows: (1) UNet forward and forward+backward, ours vs diffusers' torch UNet with the same
config and weights; (2) 50-step DDIM text-to-image with classifier-free guidance, ours (one jitted program) vs
diffusers' StableDiffusionPipeline on the same weights; (3) the LayerDiff training step at L = 2, 3, 4, 8
layers; with each, memory per step and (on accelerators) FLOPs and MFU. Times are medians of warm calls (row 1's
two sides take turns, so a VM whose speed drifts slows both alike); compile time is a separate column. The table is Markdown; --json writes every number (default under
bench_results/). Every row records the load average before and after it: one measured while the load was
above the core count is marked unreliable and never counts as meeting its target.

The check (`--suite check`, layerdiff_jax/bench/check.py) measures, in order of value, correctness against
torch, attention kernels, UNet forward speed, DDIM sampling, the train step at the largest batch that fits,
then torch.compile; it writes DIR/check.json and DIR/check.md after every row and stops at the deadline.
Exit status: 0 done; 1 a step failed (the row says why); 2 bad arguments or missing packages; 3 stopped at
the deadline. The standard suite exits 1 too where a row failed: its other rows still ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # the check's deadline counts from here: imports and set-up are part of the slot
DESCRIPTION = __doc__.split("\n\n")[0]
if importlib.util.find_spec("layerdiff_jax") is None:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where both sides run (default cpu)")
    parser.add_argument("--suite", choices=["standard", "check", "profile", "studio"], default="standard",
                        help="standard: the rows below; check: the time-boxed accelerator check (writes to --out); "
                        "profile: where the CPU time of a UNet forward+backward goes, ours and torch's, by kind of work; "
                        "studio: the layer studio's request latencies on --checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=Path("outputs/demo/train/model"),
                        help="studio: the LayerDiff model folder to serve (default: the main job's)")
    parser.add_argument("--sample-steps", type=int, help="studio: DDIM steps (default: the model's recorded settings)")
    parser.add_argument("--guidance", type=float, help="studio: guidance scale (default: the model's recorded settings)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and 2 repeats: checks that every row runs")
    parser.add_argument("--json", type=Path, help="standard suite: where to write the results (default bench_results/bench_<device>[_quick].json)")
    parser.add_argument("--out", type=Path, help="check: the folder for check.json and check.md (default bench_results/check_<device>[_quick])")
    parser.add_argument("--rows", default="unet,ddim,layers", help="standard suite: comma-separated subset of unet,ddim,layers (default: all)")
    parser.add_argument("--attention-impl", choices=["xla", "cudnn", "splash", "cpu"],
                        help="attention kernel (standard: default cpu on CPU, cudnn on GPU; check: the kernel compared with XLA, default cudnn)")
    parser.add_argument("--repeats", type=int, help="standard suite: timed warm calls per measurement (default 5 on CPU, 10 on GPU, 2 with --quick)")
    parser.add_argument("--deadline-min", type=float, default=8.0, help="check: stop after this many minutes, set-up included (default 8)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bfloat16 peak in TFLOP/s for MFU (default: measure.BF16_PEAK_FLOPS by device kind)")
    parser.add_argument("--steps", help="check: comma-separated subset of its steps a1,a2,b,c,d,b' (default: all)")
    parser.add_argument("--train-batch", type=int, help="check: the train step's batch (default: the largest that fits)")
    return parser.parse_args(argv)


def _configure_device(device: str) -> None:
    if device == "gpu":  # JAX and torch share the GPU: no grabbing 75% of it up front, but most of it on demand
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")


def _check_gpu(jax) -> str | None:
    backend = jax.devices()[0].platform
    if backend != "gpu":
        return f"--device gpu: JAX has no GPU here (backend {backend}); install the CUDA plugin: pip install -e '.[cuda]' (docs/accelerators.md, 'Install')"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _configure_device(args.device)
    from layerdiff_jax.bench.requirements import import_problem

    modules = ["jax", "layerdiff_jax.bench.suite", "layerdiff_jax.bench.torch_reference"]
    if args.suite in ("check", "profile", "studio"):
        modules.append(f"layerdiff_jax.bench.{args.suite}")
    problem = import_problem(tuple(modules))
    if problem:
        print(f"bench.py: {problem}", file=sys.stderr)
        return 2
    import jax

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")  # before any backend starts: the CPU even beside a GPU
    elif _check_gpu(jax):
        print(f"bench.py: {_check_gpu(jax)}", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print(f"--repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    try:
        if args.suite == "check":
            return _run_check(args)
        if args.suite == "profile":
            return _run_profile(args)
        if args.suite == "studio":
            return _run_studio(args)
        return _run_standard(args)
    except (ValueError, RuntimeError) as error:  # settings that cannot run here, a torch without CUDA
        print(f"bench.py: {error}", file=sys.stderr)
        return 2


def _run_standard(args: argparse.Namespace) -> int:
    import dataclasses

    from layerdiff_jax.bench.check import EXIT_STEP_FAILED
    from layerdiff_jax.bench.report import format_table
    from layerdiff_jax.bench.suite import BenchSettings, run_suite

    settings = BenchSettings.for_device(args.device, quick=args.quick, attention_impl=args.attention_impl, peak_flops=_peak(args))
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    result = run_suite(settings, rows)
    _report(result, format_table(result), args.json or Path("bench_results") / f"bench_{args.device}{'_quick' if args.quick else ''}.json")
    return EXIT_STEP_FAILED if any(row.get("status") == "failed" for row in result["rows"]) else 0


def _run_profile(args: argparse.Namespace) -> int:
    from layerdiff_jax.bench.profile import format_breakdown, run_profile

    if args.device != "cpu":
        raise ValueError("--suite profile profiles XLA:CPU: use it with --device cpu")
    result = run_profile(quick=args.quick)
    return _report(result, format_breakdown(result), args.json or Path("bench_results") / f"profile_cpu{'_quick' if args.quick else ''}.json")


def _run_studio(args: argparse.Namespace) -> int:
    from layerdiff_jax.bench.studio import format_studio, run_studio_bench

    if not (args.checkpoint / "layerdiff").is_dir():
        raise ValueError(f"--checkpoint {args.checkpoint} is not a LayerDiff model folder (the main job writes outputs/demo/train/model)")
    result = run_studio_bench(args.checkpoint, repeats=args.repeats or 5, steps=args.sample_steps, guidance=args.guidance)
    return _report(result, format_studio(result), args.json or Path("bench_results") / f"studio_{args.device}.json")


def _report(result: dict, table: str, json_path: Path) -> int:
    """Writes a suite's result as JSON and prints its table."""
    from layerdiff_jax.bench.report import write_json

    write_json(result, json_path)
    print(table)
    print(f"\nresults written to {json_path}")
    return 0


def _peak(args: argparse.Namespace) -> float | None:
    return None if args.peak_tflops is None else args.peak_tflops * 1e12


def _run_check(args: argparse.Namespace) -> int:
    from layerdiff_jax.bench.check import CheckSettings, run_check

    if args.deadline_min <= 0:
        raise ValueError(f"--deadline-min must be > 0, got {args.deadline_min}")
    settings = CheckSettings.for_device(
        args.device, quick=args.quick, deadline_s=args.deadline_min * 60, attention_impl=args.attention_impl,
        peak_flops=_peak(args), train_batch=args.train_batch, steps=args.steps and tuple(args.steps.split(",")),
    )
    out = args.out or Path("bench_results") / f"check_{args.device}{'_quick' if args.quick else ''}"
    status = run_check(settings, out, started=STARTED)
    print((out / "check.md").read_text())
    print(f"results written to {out / 'check.json'} and {out / 'check.md'} (exit status {status})")
    return status


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()  # as the trainer and the demo run: both sides are measured with it
    sys.exit(main())
