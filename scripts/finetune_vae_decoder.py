#!/usr/bin/env python
"""Fine-tunes the VAE decoder of a pretraining run's model, keeping its encoder (and so its latent space).

  finetune_vae_decoder.py RUN_DIR [--steps 1500] [--latent-noise 0.7] [--learning-rate 1e-3] [--num-samples 600]

SD's VAE decoder was fine-tuned after SD's release without retraining the UNet; this does the same for the toy
base. RUN_DIR is a workdir of `scripts/train.py --config configs/toy_sd_pretrain.py`: its model/vae is trained,
decoder and post_quant_conv only, on the images of `--num-samples` synthetic samples of the run's data seed
(layers, masks, composites, and single objects on plain backgrounds), its latents noised (a decoder that only
ever saw the encoder's exact means turns a diffusion model's imperfect latents into speckled masks and wrong
colours), and written back in place. Before and after, held-out ground truth is encoded and decoded and scored
as generated images are (layerdiff_jax/evaluation/autoencoder.py): what the base can score is bounded by it.
The numbers, the settings and the time go to RUN_DIR/vae_decoder.json, which `ship_toy_base.py` records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RECORD = "vae_decoder.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the pretraining workdir (holds model/ and config.json)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam, cosine decay to 5%% of it")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--crop", type=int, default=32, help="random square crops of the images")
    p.add_argument("--latent-noise", type=float, default=0.7, help="noise added to the latents while training: std up to this x theirs, drawn per image")
    p.add_argument("--num-samples", type=int, default=600, help="synthetic samples (the run's data seed) whose images it sees")
    p.add_argument("--count", type=int, default=48, help="held-out requests per set for the round-trip scores")
    p.add_argument("--force", action="store_true", help=f"fine-tune again although RUN_DIR/{RECORD} exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    vae_dir = args.run / "model" / "vae"
    if not (args.run / "config.json").is_file() or not vae_dir.is_dir():
        print(f"error: {args.run} is not a pretraining workdir with config.json and model/vae", file=sys.stderr)
        return 2
    if (args.run / RECORD).is_file() and not args.force:
        print(f"error: {args.run / RECORD} exists: this run's decoder was fine-tuned already (--force to do it again)", file=sys.stderr)
        return 2
    if min(args.steps, args.batch_size, args.crop, args.num_samples, args.count) < 1 or args.learning_rate <= 0:
        print("error: --steps, --batch-size, --crop, --num-samples, --count and --learning-rate must be positive", file=sys.stderr)
        return 2

    from layerdiff_jax.convert import core
    from layerdiff_jax.convert.vae import load_vae
    from layerdiff_jax.data.synthetic import generate_sample
    from layerdiff_jax.evaluation.autoencoder import round_trip_scores
    from layerdiff_jax.training.autoencoder import VAEFitConfig, collect_images, fit_vae, single_object_images

    data = json.loads((args.run / "config.json").read_text())["data"]
    seed = data["synthetic"]["seed"]
    vae, params = load_vae(vae_dir)
    before = round_trip_scores(vae, params, args.count)
    print(f"round trip before: {json.dumps(before)}", flush=True)

    start = time.perf_counter()
    samples = [generate_sample(seed, i, resolution=data["resolution"]) for i in range(args.num_samples)]
    images = np.concatenate([collect_images(samples), single_object_images(samples, seed)])
    fit = VAEFitConfig(
        steps=args.steps, batch_size=args.batch_size, crop=args.crop, learning_rate=args.learning_rate, seed=seed, decoder_only=True,
        latent_noise=args.latent_noise,
    )
    params, losses = fit_vae(vae, params, images, fit)
    seconds = time.perf_counter() - start
    after = round_trip_scores(vae, params, args.count)
    print(f"round trip after:  {json.dumps(after)}")

    core.save_flax_params(params, vae_dir / core.FLAX_PARAMS_FILE)
    record = {
        "command": "python scripts/finetune_vae_decoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "trained": "decoder and post_quant_conv (encoder frozen)",
        "steps": args.steps, "batch_size": args.batch_size, "crop": args.crop, "learning_rate": args.learning_rate, "latent_noise": args.latent_noise,
        "images": {"samples": args.num_samples, "data_seed": seed, "count": int(len(images))},
        "l1_first_last": [losses[0][1], losses[-1][1]],
        "wall_time_s": round(seconds),
        "round_trip_scores": {"before": before, "after": after, "requests_per_set": args.count},
    }
    (args.run / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {vae_dir} and {args.run / RECORD}")
    return 0


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()  # as training runs
    sys.exit(main())
