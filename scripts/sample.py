"""Generate layered images (background + foreground layers with masks) with a LayerDiff checkpoint.

  python scripts/sample.py --checkpoint workdir/model --prompt "a red circle on a blue background" \\
      --layer-prompt "a red circle" --num-samples 4 --out samples
  python scripts/sample.py --checkpoint workdir/model --spec requests.json --out samples

Each sample gets a folder in the layered exchange format (composite.png, background.png, layer_NN.png
RGBA with the mask as alpha, mask_NN.png, sample.json) plus layers.ora and layers.psd; the run gets
contact_sheet.png (of the first 64 samples). Samples are written as each batch finishes, each folder all
at once (a killed run keeps the finished samples and leaves no half-written folder under its name).

--out is locked while the run writes (a second run on it is refused, naming the first), and
records what the run wrote (.layerdiff_outputs.json): --overwrite replaces only an earlier run's samples,
and a run that did not finish (interrupted, a sample that could not be written) is marked so, which
evaluate.py and build_dataset.py refuse.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from layerdiff_jax.data.prompt_split import PromptSplitError, split_prompt
from layerdiff_jax.diffusion.settings import (
    BACKGROUND_PROMPT,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    RequestError,
    check_prompt,
    check_sampling_settings,
)
from layerdiff_jax.cli import attach_package_log, interrupted
from layerdiff_jax.fileio import Processes, claim_output_folder, output_problem

DESCRIPTION = __doc__.split("\n\n")[0]
CONTACT_SHEET_ROWS = 64  # the sheet shows the first samples only: a run's size is not bounded by memory
EPILOG = """\
prompts:
  --layer-prompt names one FOREGROUND layer; repeat it for each, deepest (furthest back) first. The
  background is layer 0, prompted by --background-prompt ("the background" by default). A checkpoint
  with max_layers=L takes at most L-1 --layer-prompt. A prompt longer than the tokenizer's limit (77
  tokens for CLIP) is truncated with a warning.
  --prompt alone is split into layers by rules over how English lists and places objects
  (layerdiff_jax/data/prompt_split.py): "a cat and a lamp in front of a window" gives the background
  "a window" and the layers "a cat", "a lamp", in the sentence's order; "with" describes an object ("a
  girl with a red umbrella" is one layer), style ("a photo of", ", digital art") stays in the global
  prompt only, and with no place named the background is "the background". The split is printed; a
  prompt the rules cannot split is refused: give --layer-prompt then. --background-prompt, if given,
  replaces the split's background.

--spec FILE.json: a list of requests, each with its own prompts and layer count, e.g.
  [{"prompt": "a red circle on a blue background", "layer_prompts": ["a red circle"]},
   {"prompt": "a green square and a red circle", "layer_prompts": ["a green square", "a red circle"],
    "background_prompt": "a blue background", "num_samples": 2, "seed": 7}]
  Fields: prompt and layer_prompts (required), background_prompt, num_samples, seed (optional).

seeds: requests without a seed draw seeds --seed, --seed+1, ... in order; a request's own seed numbers
its samples seed, seed+1, ... Each seed is recorded in its sample.json.

devices: with more than one device, every batch is sharded over all of them (batch size rounded up to a
multiple of the device count). On a multi-host pod run the same command on every host with --distributed
(processes from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, a Cloud TPU slice or SLURM, else as
jax.distributed.initialize() detects them), --out on storage every host shares: each host writes the samples its
devices drew (sample i is sample_{i:04d} whichever host draws it), process 0 the contact sheet, and the run is
marked finished only when every host wrote all of its samples.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sample.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="LayerDiff model folder (vae/, text_encoder/, tokenizer/, layerdiff/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--prompt", help="global prompt of the image")
    parser.add_argument("--layer-prompt", action="append", default=[], help="a foreground layer's prompt; repeat, deepest first")
    parser.add_argument("--background-prompt",
                        help=f'the background layer\'s prompt (default: "{BACKGROUND_PROMPT}", or the one a --prompt alone names)')
    parser.add_argument("--num-samples", type=int, default=1, help="samples of --prompt (default 1)")
    parser.add_argument("--spec", type=Path, help="JSON file with a list of requests, instead of --prompt")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default: the model folder's sampling.json, else {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float,
                        help=f"classifier-free guidance scale (default: the model folder's sampling.json, else {DEFAULT_GUIDANCE})")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the run (default 0)")
    parser.add_argument("--batch-size", type=int, help="samples per compiled batch (default: the number of devices)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="image size (default: the size the model was trained at; another size is allowed, with a warning)")
    parser.add_argument("--formats", nargs="*", default=["ora", "psd"], choices=["ora", "psd"], help="layered files per sample (default: ora psd)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier sample.py run in --out (nothing else there is deleted)")
    parser.add_argument("--distributed", action="store_true", help="multi-host run: start jax.distributed first (see devices below)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.spec is None and args.prompt is None:
        parser.error("give --prompt (alone, split into layers, or with --layer-prompt), or --spec FILE.json")
    if args.spec is not None and (args.prompt is not None or args.layer_prompt):
        parser.error("--spec replaces --prompt/--layer-prompt: give one or the other")
    prompts = [("prompt", args.prompt), ("background-prompt", args.background_prompt)]
    prompts += [(f"layer-prompt #{i}", p) for i, p in enumerate(args.layer_prompt, start=1)]
    try:
        for name, text in prompts:
            if text is not None:
                check_prompt(name, text)
        check_sampling_settings(
            steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed, num_samples=args.num_samples,
            batch_size=args.batch_size, size=tuple(args.size) if args.size else None,
        )
    except RequestError as e:  # the message starts with the setting's name: num_samples is --num-samples
        name, _, rest = str(e).partition(" ")
        parser.error(f"--{name.replace('_', '-')} {rest}")
    problem = output_problem(args.out, overwrite=args.overwrite, inputs=[args.checkpoint, args.spec])
    if problem:
        parser.error(f"--out {problem}")
    if args.prompt is not None and not args.layer_prompt:  # the prompt alone: its layers, by prompt_split's rules
        try:
            split = split_prompt(args.prompt)
        except PromptSplitError as e:
            parser.error(f"--prompt without --layer-prompt: {e}")
        args.layer_prompt = list(split.layer_prompts)
        if args.background_prompt is None:  # one given beside the prompt is the user's word
            args.background_prompt = split.background_prompt
        layers = ", ".join(f"'{p}'" for p in args.layer_prompt)
        print(f"layers from the prompt: background '{args.background_prompt}', layers: {layers}")
    if args.background_prompt is None:
        args.background_prompt = BACKGROUND_PROMPT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    detach_log = attach_package_log(sys.stderr, "sample.py: %(levelname)s: %(message)s")

    # Imported after argument checks so that usage errors come back at once, without loading JAX.
    import jax

    from layerdiff_jax.data.layers import DataError
    from layerdiff_jax.mesh import allgather_ints, data_parallel_mesh, initialize_distributed
    from layerdiff_jax.sampling import CheckpointError, LayerDiffPipeline, LayerRequest, read_request_file
    from layerdiff_jax.sampling.outputs import CONTACT_SHEET, write_contact_sheet, write_sample

    written = 0
    try:
        if args.distributed and not initialize_distributed(None, None, None):
            jax.distributed.initialize()  # a cluster JAX detects itself
        processes = Processes(jax.process_index(), allgather_ints)
        lead = processes.index == 0  # prints and writes the contact sheet; every process writes its own samples
        # Before any work: one run per folder (process 0 claims it, the others wait for it).
        with claim_output_folder(
            args.out, tool="sample.py", overwrite=args.overwrite, inputs=[args.checkpoint, args.spec], processes=processes
        ) as record:
            if args.spec is not None:
                requests = read_request_file(args.spec)
            else:
                requests = [LayerRequest(args.prompt, args.layer_prompt, args.background_prompt, args.num_samples)]
            start = time.perf_counter()
            pipe = LayerDiffPipeline.load(args.checkpoint, mesh=data_parallel_mesh())
            pipe.check_requests(requests)  # before the first compilation
            steps, guidance, settings_used = pipe.sampling.choose(args.steps, args.guidance)
            total = sum(r.num_samples for r in requests)
            if lead:
                print(f"loaded {args.checkpoint} in {time.perf_counter() - start:.1f} s; {total} sample(s) "
                      f"on {jax.device_count()} device(s)")
                print(settings_used)
            start = time.perf_counter()
            shown, failures = [], []
            batches = pipe.iter_batches(
                requests, steps=steps, guidance=guidance, eta=args.eta, seed=args.seed,
                batch_size=args.batch_size or jax.device_count(), size=tuple(args.size) if args.size else None,
                progress=lead and not args.quiet,
            )
            for batch in batches:  # written as each batch finishes
                record.start()  # at the first batch, on every process: the earlier run's entries go before any write
                if batch.start < CONTACT_SHEET_ROWS:
                    shown += batch.gather(CONTACT_SHEET_ROWS - batch.start)
                for i, sample in batch.local():  # a sample that cannot be written must not lose the others
                    name = f"sample_{i:04d}"
                    record.add(name)
                    failure = _attempt(write_sample, sample, args.out / name, formats=args.formats)
                    failures += failure
                    written += not failure
            total_written = sum(processes.allgather(written))
            if lead:
                record.add(CONTACT_SHEET)
                failures += _attempt(write_contact_sheet, shown, args.out / CONTACT_SHEET)
            # A run that lost a sample on any process stays unfinished: readers refuse it.
            if not record.finish(succeeded=not failures) and not failures:
                failures.append(
                    f"another process could not write all its outputs (its errors say which); {args.out} is marked unfinished"
                )
            if lead:
                print(f"{total_written} sample(s) in {time.perf_counter() - start:.1f} s -> {args.out}")
    except (CheckpointError, RequestError, DataError, OSError) as e:  # OSError: the folder's lock, a full disk
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return interrupted("sample.py: ", written, "sample(s)", args.out)
    finally:
        detach_log()
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
