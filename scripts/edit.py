"""Edit one layer of a layered sample with a LayerDiff checkpoint, without fine-tuning.

  python scripts/edit.py inpaint --checkpoint workdir/model --sample samples/sample_0000 --layer 1 \\
      --prompt "a green square" --out edited/inpainted
  python scripts/edit.py restyle --checkpoint workdir/model --sample samples/sample_0000 --layer 0 \\
      --style "striped" --out edited/restyled

inpaint: the target layer is re-generated from noise with a new layer prompt (100 DDIM steps).
restyle: the target layer is noised to 25 of 100 DDIM steps (--strength 0.25) and denoised with
", <style>" appended to its layer prompt. Every other layer stays bit-identical. The global prompt follows
the new layer prompt: the old one replaced where it appears, else rebuilt from the layer prompts. Steps and
guidance default to what the model folder records (sampling.json), else to the paper's 100 and 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from layerdiff_jax.diffusion.settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    RequestError,
    check_prompt,
    check_sampling_settings,
)
from layerdiff_jax.cli import attach_package_log, stopped
from layerdiff_jax.fileio import claim_output_folder, output_problem

DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = """\
--sample is a folder in the layered exchange format (what sample.py writes, or build_dataset.py's
samples): background.png, layer_NN.png, mask_NN.png, sample.json. --layer 0 is the background, 1.. the
foregrounds (layer_01.png, ...). The result is written to --out in the same format, with layers.ora and
layers.psd; its sample.json lists the edit under "edits". --out may not be, contain or lie inside --sample
or --checkpoint; it is locked while the edit runs, and --overwrite replaces only an earlier edit's files.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="edit.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{inpaint,restyle}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, type=Path, help="LayerDiff model folder")
    common.add_argument("--sample", required=True, type=Path, help="exchange-format sample folder to edit")
    common.add_argument("--layer", required=True, type=int, help="target layer: 0 = background, 1.. = foregrounds")
    common.add_argument("--out", required=True, type=Path, help="output folder (must be empty unless --overwrite)")
    common.add_argument("--steps", type=int,
                        help=f"DDIM steps of the full schedule (default: the model folder's sampling.json, else {DEFAULT_STEPS})")
    common.add_argument("--guidance", type=float,
                        help=f"classifier-free guidance scale (default: the model folder's sampling.json, else {DEFAULT_GUIDANCE})")
    common.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    common.add_argument("--seed", type=int, default=0, help="seed of the target layer's noise (default 0)")
    common.add_argument("--formats", nargs="*", default=["ora", "psd"], choices=["ora", "psd"], help="layered files (default: ora psd)")
    common.add_argument("--overwrite", action="store_true", help="replace an earlier edit in --out (nothing else there is deleted)")
    inpaint = commands.add_parser("inpaint", parents=[common], help="re-generate a layer from noise with a new prompt")
    inpaint.add_argument("--prompt", required=True, help="the target layer's new prompt")
    inpaint.add_argument("--global-prompt", help="the edited sample's global prompt (default: the sample's, following --prompt)")
    restyle = commands.add_parser("restyle", parents=[common], help="restyle a layer (img2img on that layer)")
    restyle.add_argument("--style", required=True, help='style text appended to the layer prompt, e.g. "in van gogh style"')
    restyle.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help=f"fraction of the steps to noise and denoise (default {DEFAULT_STRENGTH})")
    args = parser.parse_args(argv)

    if not (args.sample / "sample.json").is_file():
        parser.error(f"--sample {args.sample} is not a layered sample folder (no sample.json)")
    # The source sample and the model are kept: --out may not be, contain or lie inside either.
    problem = output_problem(args.out, overwrite=args.overwrite, inputs=[args.sample, args.checkpoint])
    if problem:
        parser.error(f"--out {problem}")
    try:
        for name in ("prompt", "global_prompt", "style"):
            if getattr(args, name, None) is not None:
                check_prompt(name.replace("_", "-"), getattr(args, name))
        check_sampling_settings(
            steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed, strength=getattr(args, "strength", None)
        )
    except RequestError as e:
        parser.error(f"--{e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    detach_log = attach_package_log(sys.stderr, "edit.py: %(levelname)s: %(message)s")

    from layerdiff_jax.data.layers import DataError, read_sample_folder
    from layerdiff_jax.sampling import CheckpointError, LayerDiffPipeline, inpaint_layer, restyle_layer, write_sample

    try:
        with claim_output_folder(args.out, tool="edit.py", overwrite=args.overwrite, inputs=[args.sample, args.checkpoint]) as record:
            sample = read_sample_folder(args.sample)
            pipe = LayerDiffPipeline.load(args.checkpoint)  # one sample: one device is enough
            start = time.perf_counter()
            steps, guidance, settings_used = pipe.sampling.choose(args.steps, args.guidance)
            print(settings_used)
            settings = dict(seed=args.seed, steps=steps, guidance=guidance, eta=args.eta)
            if args.command == "inpaint":
                edited = inpaint_layer(pipe, sample, args.layer, args.prompt, global_prompt=args.global_prompt, **settings)
            else:
                edited = restyle_layer(pipe, sample, args.layer, args.style, strength=args.strength, **settings)
            try:
                write_sample(edited, args.out, formats=args.formats)
            finally:  # the out folder is the sample itself: its entries are the files written
                record.add(*(p.name for p in args.out.iterdir() if not p.name.startswith(".")))
            record.finish()
    except (CheckpointError, RequestError, DataError, OSError, KeyboardInterrupt) as e:  # OSError: the folder's lock, a layered file, a full disk
        return stopped("edit.py", e, args.out)
    finally:
        detach_log()
    print(f"{args.command} layer {args.layer} in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    sys.exit(main())
