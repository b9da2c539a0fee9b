"""Edit one layer of a layered sample with a LayerDiff checkpoint, without fine-tuning.

  python scripts/edit.py inpaint --checkpoint workdir/model --sample samples/sample_0000 --layer 1 \\
      --prompt "a green square" --out edited/inpainted
  python scripts/edit.py restyle --checkpoint workdir/model --sample samples/sample_0000 --layer 0 \\
      --style "striped" --out edited/restyled

inpaint: the target layer is re-generated from noise with a new layer prompt (100 DDIM steps).
restyle: the target layer is noised to 25 of 100 DDIM steps (--strength 0.25) and denoised with
", <style>" appended to its layer prompt. Every other layer stays bit-identical.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from layerdiff_jax.diffusion.settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    RequestError,
    check_sampling_settings,
)
from layerdiff_jax.fileio import output_folder_problem

DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = """\
--sample is a folder in the layered exchange format (what sample.py writes, or build_dataset.py's
samples): background.png, layer_NN.png, mask_NN.png, sample.json. --layer 0 is the background, 1.. the
foregrounds (layer_01.png, ...). The result is written to --out in the same format, with layers.ora and
layers.psd; its sample.json lists the edit under "edits".
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
    common.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps of the full schedule (default {DEFAULT_STEPS})")
    common.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    common.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    common.add_argument("--seed", type=int, default=0, help="seed of the target layer's noise (default 0)")
    common.add_argument("--formats", nargs="*", default=["ora", "psd"], choices=["ora", "psd"], help="layered files (default: ora psd)")
    common.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    inpaint = commands.add_parser("inpaint", parents=[common], help="re-generate a layer from noise with a new prompt")
    inpaint.add_argument("--prompt", required=True, help="the target layer's new prompt")
    inpaint.add_argument("--global-prompt", help="replace the sample's global prompt")
    restyle = commands.add_parser("restyle", parents=[common], help="restyle a layer (img2img on that layer)")
    restyle.add_argument("--style", required=True, help='style text appended to the layer prompt, e.g. "in van gogh style"')
    restyle.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help=f"fraction of the steps to noise and denoise (default {DEFAULT_STRENGTH})")
    args = parser.parse_args(argv)

    if not (args.sample / "sample.json").is_file():
        parser.error(f"--sample {args.sample} is not a layered sample folder (no sample.json)")
    if args.out.resolve() == args.sample.resolve():
        parser.error("--out must differ from --sample (the source sample is kept)")
    problem = output_folder_problem(args.out, overwrite=args.overwrite)
    if problem:
        parser.error(f"--out {problem}")
    try:
        check_sampling_settings(
            steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed, strength=getattr(args, "strength", None)
        )
    except RequestError as e:
        parser.error(f"--{e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edit.py: %(levelname)s: %(message)s"))
    package_logger = logging.getLogger("layerdiff_jax")
    package_logger.addHandler(handler)

    from layerdiff_jax.data.layers import DataError, ExtraFileError, read_sample_folder
    from layerdiff_jax.sampling import CheckpointError, LayerDiffPipeline, inpaint_layer, restyle_layer, write_sample

    try:
        sample = read_sample_folder(args.sample)
        pipe = LayerDiffPipeline.load(args.checkpoint)  # one sample: one device is enough
        start = time.perf_counter()
        settings = dict(seed=args.seed, steps=args.steps, guidance=args.guidance, eta=args.eta)
        if args.command == "inpaint":
            edited = inpaint_layer(pipe, sample, args.layer, args.prompt, global_prompt=args.global_prompt, **settings)
        else:
            edited = restyle_layer(pipe, sample, args.layer, args.style, strength=args.strength, **settings)
        write_sample(edited, args.out, formats=args.formats)
    except (CheckpointError, RequestError, DataError, ExtraFileError) as e:
        print(f"edit.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
    print(f"{args.command} layer {args.layer} in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    sys.exit(main())
