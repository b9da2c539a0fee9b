#!/usr/bin/env python
"""The main job, end to end on CPU: data -> toy VAE -> LayerDiff training -> sampling -> evaluation.

  python scripts/demo.py [--config configs/demo.py] [--config.<field>=<value> ...]

Everything lands under the config's out_dir (outputs/demo/): data/, toy_sd/, train/ (checkpoints, metrics,
the exported model folder train/model/), samples/ (one exchange-format folder per sample, contact_sheet.png),
metrics.json. A rerun reuses finished stages (dataset, VAE, training checkpoints) and redoes the rest.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent.parent / "configs" / "demo.py"), "demo config", lock_config=True
)


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float, timings: dict, key: str) -> None:
    timings[key] = round(time.perf_counter() - start, 1)
    print(f"   done in {timings[key]:.0f} s", flush=True)


def held_out_requests(config):
    """`per_layer_count` requests for each of 2, 3 and 4 layers: the prompts of unseen synthetic samples."""
    from layerdiff_jax.data.synthetic import generate_sample
    from layerdiff_jax.sampling.sampler import LayerRequest

    wanted = {n: [] for n in (2, 3, 4)}
    index = 0
    while any(len(v) < config.sample.per_layer_count for v in wanted.values()):
        s = generate_sample(config.sample.request_seed, index, resolution=config.data.resolution)
        index += 1
        if len(wanted.get(s.num_layers, [None] * config.sample.per_layer_count)) < config.sample.per_layer_count:
            wanted[s.num_layers].append(
                LayerRequest(s.global_prompt, s.layer_prompts[1:], background_prompt=s.layer_prompts[0], seed=config.sample.seed + index)
            )
    return [r for n in sorted(wanted) for r in wanted[n]]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO
    config = _CONFIG.value
    out = Path(config.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    job_start = time.perf_counter()

    import jax

    from layerdiff_jax.convert.pipeline import CONVERSION_RECORD
    from layerdiff_jax.data.synthetic import generate_sample, parse_layer_mix
    from layerdiff_jax.data.tfds_builders import build_synthetic, find_dataset_dir
    from layerdiff_jax.evaluation.report import evaluate_samples, format_table
    from layerdiff_jax.models.init import init_params
    from layerdiff_jax.models.vae import AutoencoderKL
    from layerdiff_jax.sampling.outputs import write_contact_sheet, write_sample
    from layerdiff_jax.sampling.sampler import LayerDiffPipeline
    from layerdiff_jax.toy import make_toy_sd, toy_configs
    from layerdiff_jax.data.tokenizer import build_toy_tokenizer
    from layerdiff_jax.training import autoencoder
    from layerdiff_jax.training.trainer import train

    print(f"layerdiff_jax demo on {jax.device_count()} {jax.devices()[0].platform} device(s); writing to {out}")

    # 1. Data.
    start = _stage(f"1/5 synthetic layered dataset: {config.data.num_train} samples at {config.data.resolution}x{config.data.resolution}")
    data_dir = out / "data"
    if not list(data_dir.rglob("dataset_info.json")):
        build_synthetic(
            data_dir, num_train=config.data.num_train, num_test=0, resolution=config.data.resolution,
            seed=config.data.seed, layer_mix=parse_layer_mix(config.data.layer_mix),
        )
    else:
        print(f"   reusing {data_dir}")
    _done(start, timings, "data_s")

    # 2. Toy SD: fit the VAE on layers and masks, then write VAE + random CLIP text encoder + UNet + tokenizer.
    start = _stage(f"2/5 toy VAE: {config.vae.steps} steps on the layers and masks of {config.vae.num_samples} samples")
    sd_dir = out / "toy_sd"
    if not (sd_dir / CONVERSION_RECORD).is_file():
        vae = AutoencoderKL(toy_configs(build_toy_tokenizer().vocab_size)["vae"])
        images = autoencoder.collect_images(
            generate_sample(config.data.seed, i, resolution=config.data.resolution) for i in range(config.vae.num_samples)
        )
        params = init_params(vae, jax.random.key(config.train.seed), autoencoder.to_model_range(images[:1]))
        params, losses = autoencoder.fit_vae(
            vae, params, images,
            autoencoder.VAEFitConfig(
                steps=config.vae.steps, batch_size=config.vae.batch_size, crop=config.vae.crop,
                min_content=config.vae.min_content, learning_rate=config.vae.learning_rate,
                kl_weight=config.vae.kl_weight, seed=config.train.seed,
            ),
        )
        scale = autoencoder.latent_scaling_factor(vae, params, images[:1024])
        print(f"   reconstruction L1 {losses[-1][1]:.4f}; latent scaling factor {scale:.4f}")
        make_toy_sd(sd_dir, seed=config.train.seed, params={"vae": params}, vae_scaling_factor=scale, overwrite=True)
    else:
        print(f"   reusing {sd_dir}")
    _done(start, timings, "toy_vae_s")

    # 3. Train LayerDiff, for the time the budget leaves.
    train_config = config.train.copy_and_resolve_references()
    limit = ""
    if config.time_budget_s:
        elapsed = time.perf_counter() - job_start
        left = config.time_budget_s - elapsed - config.sampling_reserve_s
        if left <= 0:
            raise SystemExit(
                f"the data and VAE stages took {elapsed:.0f} s of the {config.time_budget_s:g} s "
                f"budget, leaving no time to train: raise --config.time_budget_s or set it to 0 to train num_steps"
            )
        train_config.train.time_limit_s = left
        limit = f" or {left:.0f} s, whichever comes first"
    start = _stage(f"3/5 LayerDiff training: {train_config.train.num_steps} steps{limit}, batch {train_config.train.per_host_batch_size}")
    train_config.model.sd_path = str(sd_dir)
    train_config.data.path = str(find_dataset_dir(data_dir))
    train_config.data.resolution = config.data.resolution
    result = train(train_config, out / "train")
    if result.out_of_time:
        print(f"   stopped at step {result.step} to leave time for sampling")
    _done(start, timings, "train_s")

    # 4. Sample.
    requests = held_out_requests(config)
    start = _stage(f"4/5 sampling {len(requests)} requests with 2, 3 and 4 layers: {config.sample.steps} DDIM steps, guidance {config.sample.guidance}")
    pipe = LayerDiffPipeline.load(result.model_dir)
    samples_dir = out / "samples"
    samples = pipe.generate(
        requests, steps=config.sample.steps, guidance=config.sample.guidance, eta=config.sample.eta,
        seed=config.sample.seed, batch_size=config.sample.batch_size,
        size=(config.data.resolution, config.data.resolution),
    )
    for i, sample in enumerate(samples):
        write_sample(sample, samples_dir / f"sample_{i:04d}")
    write_contact_sheet(samples, samples_dir / "contact_sheet.png")
    _done(start, timings, "sample_s")

    # 5. Evaluate.
    start = _stage("5/5 evaluation")
    metrics = evaluate_samples(samples_dir)
    _done(start, timings, "evaluate_s")
    timings["total_s"] = round(time.perf_counter() - job_start, 1)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    losses = [row["loss"] for row in _read_jsonl(out / "train" / "metrics.jsonl") if "loss" in row]
    metrics["demo"] = {
        "timings_s": timings,
        "train_steps": result.step,
        "peak_rss_gib": round(peak_rss_gib, 2),
        "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "config": json.loads(config.to_json_best_effort()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print("\n" + format_table(metrics))
    print(f"\nresults in {out}: samples/ (one folder per sample, contact_sheet.png), train/model/ (the checkpoint),")
    print(f"metrics.json. Total {timings['total_s']:.0f} s, peak memory {peak_rss_gib:.1f} GiB.")
    return 0


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    app.run(lambda argv: sys.exit(main(argv)))
