"""Convert PyTorch Stable Diffusion 1.x weights into a folder layerdiff_jax loads directly.

  python scripts/convert_weights.py --source stable-diffusion-v1-5 --output sd15_flax
  python scripts/convert_weights.py --source v1-5-pruned-emaonly.safetensors --tokenizer sd/tokenizer --output sd15_flax

The output has unet/, vae/, text_encoder/ (config.json + flax_params.safetensors), tokenizer/ and
layerdiff_conversion.json; `layerdiff_jax.convert.load_unet("sd15_flax/unet")` etc. read it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from layerdiff_jax.cli import attach_package_log, stopped

EPILOG = """\
sources:
  a diffusers-format folder    unet/, vae/, text_encoder/ (config.json + *.safetensors or *.bin) and
                               tokenizer/, as in a stable-diffusion-v1-5 download
  a single-file checkpoint     the original (LDM/CompVis) SD-1.x .safetensors or .ckpt; .ckpt pickles are
                               read with torch.load(weights_only=True). Its architecture is SD 1.5's
                               unless --config names a diffusers-style folder describing it.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source", required=True, type=Path, help="diffusers-format SD folder, or a single .safetensors/.ckpt file"
    )
    parser.add_argument("--output", required=True, type=Path, help="folder to write the converted model to")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer folder to copy (vocab.json + merges.txt or tokenizer.json); default: the source's "
        "(or --config's) tokenizer/ when it has one",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="single-file sources only: a diffusers-style folder whose unet/, vae/, text_encoder/ config.json "
        "describe the checkpoint (default: SD 1.5's architecture)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the converted entries of an existing output folder"
    )
    args = parser.parse_args(argv)

    if not args.source.exists():
        parser.error(f"--source {args.source} does not exist")
    if args.source.is_dir() and args.config is not None:
        parser.error("--config is only for single-file sources; a diffusers folder carries its own configs")
    if args.config is not None and not args.config.is_dir():
        parser.error(f"--config {args.config} is not a folder")
    return args


def default_tokenizer(tokenizer: Path | None, config_dir: Path | None) -> Path | None:
    """--tokenizer if given, else the config folder's (the source folder's) tokenizer/ when it has one."""
    if tokenizer is None and config_dir is not None and (config_dir / "tokenizer").is_dir():
        return config_dir / "tokenizer"
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    detach_log = attach_package_log(sys.stdout, "  %(message)s", logging.INFO)

    # Imported after argument checks so that usage errors come back at once, without loading JAX.
    from layerdiff_jax.convert.core import ConversionError
    from layerdiff_jax.convert.sd_folder import (
        CONVERSION_RECORD,
        CONVERTED_ENTRIES,
        check_output_dir,
        check_tokenizer_dir,
        load_sd,
        save_converted,
    )
    from layerdiff_jax.fileio import claim_output_folder

    kind = "diffusers folder" if args.source.is_dir() else "single-file checkpoint"
    config_dir = args.source if args.source.is_dir() else args.config  # where config.json files are copied from
    start = time.perf_counter()
    try:
        tokenizer = default_tokenizer(args.tokenizer, config_dir)
        if tokenizer is not None:
            check_tokenizer_dir(tokenizer)
        # Checked before the (long) conversion: files inside the entries a conversion replaces, then the folder.
        inputs = [args.source, config_dir, tokenizer]
        check_output_dir(args.output, inputs=inputs, overwrite=args.overwrite)
        # A folder converted before output records existed is adopted by its conversion record.
        adopt = CONVERTED_ENTRIES if (args.output / CONVERSION_RECORD).is_file() else ()
        with claim_output_folder(args.output, tool="convert_weights.py", overwrite=args.overwrite, inputs=inputs, adopt=adopt) as written:
            print(f"converting {args.source} ({kind})")
            components = load_sd(args.source, config_dir=args.config)
            print(f"writing {args.output}")
            written.add(*CONVERTED_ENTRIES)  # before writing: an interrupted write is recorded as such
            record = save_converted(
                args.output, components, source=args.source, config_dir=config_dir, tokenizer_dir=tokenizer, overwrite=True
            )
            written.finish()
    except (ConversionError, ValueError, OSError, KeyboardInterrupt) as e:  # OSError: missing inputs, the folder's lock, a full disk
        return stopped("convert_weights.py", e, args.output)
    finally:
        detach_log()

    print(f"done in {time.perf_counter() - start:.1f} s: {args.output}")
    for name, count in record["parameters"].items():
        print(f"  {name:<13} {count:>13,} parameters")
    print(f"  tokenizer     {record['tokenizer'] or 'none (sampling needs one: rerun with --tokenizer DIR)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
