"""Generate layered images (background + foreground layers with masks) with a LayerDiff checkpoint.

  python scripts/sample.py --checkpoint workdir/model --prompt "a red circle on a blue background" \\
      --layer-prompt "a red circle" --num-samples 4 --out samples
  python scripts/sample.py --checkpoint workdir/model --spec requests.json --out samples

Each sample gets a folder in the layered exchange format (composite.png, background.png, layer_NN.png
RGBA with the mask as alpha, mask_NN.png, sample.json) plus layers.ora and layers.psd; the run gets
contact_sheet.png. Samples are written as each batch finishes, each folder all at once (a killed run
keeps the finished samples and leaves no half-written folder under its name).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from layerdiff_jax.diffusion.settings import (
    BACKGROUND_PROMPT,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    RequestError,
    check_sampling_settings,
)
from layerdiff_jax.fileio import output_folder_problem

DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = """\
prompts:
  --layer-prompt names one FOREGROUND layer; repeat it for each, deepest (furthest back) first. The
  background is layer 0, prompted by --background-prompt ("the background" by default). A checkpoint
  with max_layers=L takes at most L-1 --layer-prompt. A prompt longer than the tokenizer's limit (77
  tokens for CLIP) is truncated with a warning.

--spec FILE.json: a list of requests, each with its own prompts and layer count, e.g.
  [{"prompt": "a red circle on a blue background", "layer_prompts": ["a red circle"]},
   {"prompt": "a green square and a red circle", "layer_prompts": ["a green square", "a red circle"],
    "background_prompt": "a blue background", "num_samples": 2, "seed": 7}]
  Fields: prompt and layer_prompts (required), background_prompt, num_samples, seed (optional).

seeds: requests without a seed draw seeds --seed, --seed+1, ... in order; a request's own seed numbers
its samples seed, seed+1, ... Each seed is recorded in its sample.json.

devices: with more than one device, every batch is sharded over all of them (batch size rounded up to a
multiple of the device count). On a multi-host pod run the same command on every host with
--distributed; process 0 writes the outputs.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sample.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="LayerDiff model folder (vae/, text_encoder/, tokenizer/, layerdiff/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--prompt", help="global prompt of the image")
    parser.add_argument("--layer-prompt", action="append", default=[], help="a foreground layer's prompt; repeat, deepest first")
    parser.add_argument("--background-prompt", default=BACKGROUND_PROMPT, help=f'the background layer\'s prompt (default: "{BACKGROUND_PROMPT}")')
    parser.add_argument("--num-samples", type=int, default=1, help="samples of --prompt (default 1)")
    parser.add_argument("--spec", type=Path, help="JSON file with a list of requests, instead of --prompt")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the run (default 0)")
    parser.add_argument("--batch-size", type=int, help="samples per compiled batch (default: the number of devices)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="image size (default: the size the model was trained at; another size is allowed, with a warning)")
    parser.add_argument("--formats", nargs="*", default=["ora", "psd"], choices=["ora", "psd"], help="layered files per sample (default: ora psd)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--distributed", action="store_true", help="multi-host run: call jax.distributed.initialize() first")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.spec is None and args.prompt is None:
        parser.error("give --prompt with at least one --layer-prompt, or --spec FILE.json")
    if args.spec is not None and (args.prompt is not None or args.layer_prompt):
        parser.error("--spec replaces --prompt/--layer-prompt: give one or the other")
    if args.prompt is not None and not args.layer_prompt:
        parser.error("no layer prompt: give at least one --layer-prompt (a foreground layer)")
    for name in ("num_samples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        check_sampling_settings(steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed)
    except RequestError as e:
        parser.error(f"--{e}")
    problem = output_folder_problem(args.out, overwrite=args.overwrite)
    if problem:
        parser.error(f"--out {problem}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sample.py: %(levelname)s: %(message)s"))
    package_logger = logging.getLogger("layerdiff_jax")
    package_logger.addHandler(handler)

    # Imported after argument checks so that usage errors come back at once, without loading JAX.
    import jax

    from layerdiff_jax.data.layers import DataError
    from layerdiff_jax.mesh import data_parallel_mesh
    from layerdiff_jax.sampling import CheckpointError, LayerDiffPipeline, LayerRequest, read_request_file
    from layerdiff_jax.sampling.outputs import CONTACT_SHEET, write_contact_sheet, write_sample

    try:
        if args.distributed:
            jax.distributed.initialize()
        if args.spec is not None:
            requests = read_request_file(args.spec)
        else:
            requests = [LayerRequest(args.prompt, args.layer_prompt, args.background_prompt, args.num_samples)]
        start = time.perf_counter()
        pipe = LayerDiffPipeline.load(args.checkpoint, mesh=data_parallel_mesh())
        pipe.check_requests(requests)  # before the first compilation
        writer = jax.process_index() == 0
        if writer:
            print(f"loaded {args.checkpoint} in {time.perf_counter() - start:.1f} s; {sum(r.num_samples for r in requests)} sample(s) "
                  f"on {jax.device_count()} device(s)")
        start = time.perf_counter()
        samples, failures = [], []
        generated = pipe.iter_generate(
            requests, steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed,
            batch_size=args.batch_size or jax.device_count(), size=tuple(args.size) if args.size else None,
            progress=writer and not args.quiet,
        )
        for i, sample in enumerate(generated):  # written as each batch finishes
            samples.append(sample)
            if writer:  # a sample that cannot be written must not lose the others
                failures += _attempt(write_sample, sample, args.out / f"sample_{i:04d}", formats=args.formats)
        if writer:
            failures += _attempt(write_contact_sheet, samples, args.out / CONTACT_SHEET)
            print(f"{len(samples)} sample(s) in {time.perf_counter() - start:.1f} s -> {args.out}")
    except (CheckpointError, RequestError, DataError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
    for failure in failures:
        print(f"sample.py: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _attempt(write, *args, **kwargs) -> list[str]:
    """Runs one output writer; returns [] or [what failed], so that one failure does not stop the others."""
    try:
        write(*args, **kwargs)
    except (OSError, ValueError) as e:  # ExtraFileError and DataError name the file, OSError its path
        return [str(e)]
    return []


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    sys.exit(main())
