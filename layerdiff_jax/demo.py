"""The main job, as library code: LayerDiff fine-tuned on CPU from the shipped toy base, then sampled and scored.

`run(config)` (config: `configs/demo.py`) does what a user does with converted SD-1.5, at toy size:

1. data       the synthetic layered dataset (TFDS/array_record), built once under out_dir/data
2. base       the pretrained text-to-image model LayerDiff starts from: the shipped toy base
              (`layerdiff_jax/assets/toy_base`), any SD folder, or "scratch" (a random toy SD with a fitted VAE)
3. step 0     LayerDiff initialised from the base (`init_from_sd`), sampled and scored before any fine-tuning
4. fine-tune  the real trainer, for the time the budget leaves (a rerun resumes)
5. sample     the held-out requests (`sample.per_layer_count` each with 2, 3 and 4 layers), one exchange-format
              folder per sample
6. evaluate   prompt following per layer count; metrics.json holds step 0 beside the final scores
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from layerdiff_jax.convert.core import read_config
from layerdiff_jax.convert.model_folder import load_scheduler_config
from layerdiff_jax.convert.unet import load_unet
from layerdiff_jax.data.synthetic import FOREGROUND_FILLS, generate_sample, parse_colour_weights, parse_layer_mix
from layerdiff_jax.data.tfds_builders import build_synthetic, find_dataset_dir
from layerdiff_jax.evaluation.report import evaluate_samples, format_table
from layerdiff_jax.models.layerdiff import LayerDiffConfig, init_from_sd
from layerdiff_jax.models.vae import VAEConfig
from layerdiff_jax.sampling.outputs import write_contact_sheet, write_sample
from layerdiff_jax.sampling.sampler import LayerDiffPipeline, LayerRequest
from layerdiff_jax.toy import TOY_BASE
from layerdiff_jax.training.config import (
    TOY_SD,
    ConfigError,
    base_config,
    check_fields,
    validate_config,
)
from layerdiff_jax.training.export import export_model, recorded_sampling
from layerdiff_jax.training.metric_writer import read_metrics
from layerdiff_jax.training.trainer import prepare_sd, train

SHIPPED, SCRATCH = "shipped", "scratch"  # config.base: the shipped toy base, or a random toy SD


def demo_config() -> ml_collections.ConfigDict:
    """Every field `run` reads; configs/demo.py starts from it. `finetune` is a training config
    (`training.config.base_config()` schema) whose model.sd_path, data.path and log.sample_* the demo fills in."""
    c = ml_collections.ConfigDict()
    c.out_dir = "outputs/demo"
    # What fine-tuning starts from: "shipped" (the pretrained toy base), "scratch" (a random toy SD whose VAE is
    # fitted first, as finetune.model.toy_vae says), or the path of any SD folder.
    c.base = SHIPPED
    c.time_budget_s = 15 * 60.0  # the whole job; fine-tuning gets what the other stages leave. 0: num_steps
    c.sampling_reserve_s = 90.0  # kept back for sampling and evaluation

    c.data = ml_collections.ConfigDict()  # the synthetic layered dataset fine-tuning reads
    c.data.num_train = 4000
    c.data.resolution = 64
    c.data.layer_mix = "2:0.34,3:0.33,4:0.33"
    c.data.colour_weights = ""  # 'colour:weight,...': foregrounds of these colours drawn more often
    c.data.foreground_fill = "black"  # a foreground layer outside its object (the mask hides it), or "contrast"
    c.data.similar_colours = 0.0  # fraction of samples whose objects are in colours near their neighbour's
    c.data.seed = 0

    c.finetune = base_config()

    c.sample = ml_collections.ConfigDict()
    c.sample.per_layer_count = 16  # requests with 2, 3 and 4 layers each
    # Step 0 only shows where fine-tuning starts: the first this many of them, so that its sampling leaves
    # the budget to fine-tuning.
    c.sample.step0_per_layer_count = 16
    c.sample.request_seed = 1_000_000  # held-out synthetic samples: no training data uses this seed
    c.sample.steps = 25  # DDIM steps
    c.sample.guidance = 1.0
    c.sample.eta = 0.0
    c.sample.batch_size = 16
    c.sample.seed = 0
    return c


def validate_demo_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` if its fields are `demo_config()`'s, typed alike, and `finetune` is a valid training config;
    else ConfigError naming the field."""
    reference = demo_config()
    check_fields(config, reference)
    try:
        validate_config(config.finetune)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.", "config.finetune.", 1)) from None
    for field, parse in (("layer_mix", parse_layer_mix), ("colour_weights", parse_colour_weights)):
        try:
            parse(config.data[field])
        except ValueError as e:
            raise ConfigError(f"config.data.{field}: {e}") from None
    if config.data.foreground_fill not in FOREGROUND_FILLS:
        raise ConfigError(f"config.data.foreground_fill={config.data.foreground_fill!r}: expected one of {', '.join(FOREGROUND_FILLS)}")
    if not 0.0 <= config.data.similar_colours <= 1.0:
        raise ConfigError(f"config.data.similar_colours={config.data.similar_colours}: expected a fraction in [0, 1]")
    for field in ("per_layer_count", "step0_per_layer_count"):
        if config.sample[field] < 1:
            raise ConfigError(f"config.sample.{field} must be >= 1, got {config.sample[field]}")
    if config.base not in (SHIPPED, SCRATCH) and not Path(config.base).is_dir():
        raise ConfigError(f"config.base={config.base!r} is neither 'shipped', 'scratch' nor an SD folder")
    return config


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training config of the fine-tuning (model.sd_path and data.path still to fill in): `config.finetune` at
    the data's resolution, its model folders recording the settings the demo samples them with (sampling.json)."""
    train_config = config.finetune.copy_and_resolve_references()
    train_config.data.resolution = config.data.resolution
    train_config.log.sample_steps, train_config.log.sample_guidance = config.sample.steps, config.sample.guidance
    train_config.log.record_sample_settings = True
    return train_config


class Stage:
    """Prints a stage's title, then its duration into `timings[key]`."""

    def __init__(self, title: str, timings: dict[str, float], key: str):
        self.title, self.timings, self.key = title, timings, key

    def __enter__(self):
        print(f"\n== {self.title}", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.key] = round(time.perf_counter() - self.start, 1)
        if exc[0] is None:
            print(f"   done in {self.timings[self.key]:.0f} s", flush=True)


def held_out_requests(per_layer_count: int, request_seed: int, sample_seed: int, resolution: int) -> list[LayerRequest]:
    """`per_layer_count` requests for each of 2, 3 and 4 layers: the prompts of synthetic samples drawn with
    `request_seed`, a seed neither the base's pretraining nor the fine-tuning data uses."""
    wanted: dict[int, list[LayerRequest]] = {n: [] for n in (2, 3, 4)}
    index = 0
    while any(len(v) < per_layer_count for v in wanted.values()):
        s = generate_sample(request_seed, index, resolution=resolution)
        index += 1
        if s.num_layers in wanted and len(wanted[s.num_layers]) < per_layer_count:
            wanted[s.num_layers].append(
                LayerRequest(s.global_prompt, s.layer_prompts[1:], background_prompt=s.layer_prompts[0], seed=sample_seed + index)
            )
    return [r for n in sorted(wanted) for r in wanted[n]]


def build_data(data: ml_collections.ConfigDict, out: Path) -> Path:
    """The synthetic layered dataset under out/data (built once); returns the built dataset folder."""
    root = out / "data"
    if list(root.rglob("dataset_info.json")):
        print(f"   reusing {root}")
    else:
        build_synthetic(
            root, num_train=data.num_train, num_test=0, resolution=data.resolution, seed=data.seed,
            layer_mix=parse_layer_mix(data.layer_mix), colour_weights=parse_colour_weights(data.colour_weights),
            foreground_fill=data.foreground_fill, similar_colours=data.similar_colours,
        )
    return find_dataset_dir(root)


def base_folder(config: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict, out: Path) -> Path:
    """The SD folder fine-tuning starts from (see the module docstring, stage 2)."""
    if config.base == SHIPPED:
        return TOY_BASE
    if config.base == SCRATCH:
        scratch = train_config.copy_and_resolve_references()
        scratch.model.sd_path = TOY_SD
        return prepare_sd(scratch, out)  # writes out/toy_sd once
    return Path(config.base)


def export_step0(base: Path, train_config: ml_collections.ConfigDict, out_dir: Path) -> Path:
    """The LayerDiff model folder of the base with LayerDiff's new modules at their initialisation, recording what
    fine-tuning's export records: the training resolution and the sampling settings."""
    if (out_dir / "layerdiff").is_dir():
        return out_dir
    unet, unet_params = load_unet(base / "unet")
    model, params = init_from_sd(unet, unet_params, LayerDiffConfig(**train_config.model.layerdiff), jax.random.key(train_config.seed))
    scheduler = dataclasses.replace(load_scheduler_config(base), prediction_type=train_config.diffusion.prediction_type)
    latent_size = train_config.data.resolution // read_config(base / "vae", VAEConfig.from_diffusers_config).downsample_factor
    return export_model(out_dir, base, model, params, scheduler, sample_size=latent_size, sampling=recorded_sampling(train_config))


def sample_and_score(model_dir: Path, requests: list[LayerRequest], sample: ml_collections.ConfigDict, resolution: int, out_dir: Path) -> dict[str, Any]:
    """Samples `requests` from a LayerDiff model folder into out_dir (sample folders, contact sheet) and
    scores them."""
    pipe = LayerDiffPipeline.load(model_dir)
    samples = []
    for s in pipe.iter_generate(  # written as each batch finishes
        requests, steps=sample.steps, guidance=sample.guidance, eta=sample.eta, seed=sample.seed,
        batch_size=sample.batch_size, size=(resolution, resolution),
    ):
        write_sample(s, out_dir / f"sample_{len(samples):04d}")
        samples.append(s)
    write_contact_sheet(samples, out_dir / "contact_sheet.png")
    return evaluate_samples(out_dir)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The whole job; returns (and writes to out_dir/metrics.json) the final metrics with step 0's beside them."""
    out = Path(config.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    job_start = time.perf_counter()
    # Compiled programs persist under out/: the final sampling reuses step 0's, and a rerun all of them.
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    timings: dict[str, float] = {}
    validate_demo_config(config)
    train_config = finetune_config(config)
    requests, step0_requests = (
        held_out_requests(count, config.sample.request_seed, config.sample.seed, config.data.resolution)
        for count in (config.sample.per_layer_count, config.sample.step0_per_layer_count)
    )
    print(f"layerdiff_jax demo on {jax.device_count()} {jax.devices()[0].platform} device(s); writing to {out}")

    with Stage(f"1/5 synthetic layered dataset: {config.data.num_train} samples at {config.data.resolution}x{config.data.resolution}", timings, "data_s"):
        train_config.data.path = str(build_data(config.data, out))

    with Stage(f"2/5 base model ({config.base}) and its score before fine-tuning", timings, "step0_s"):
        base = base_folder(config, train_config, out)
        train_config.model.sd_path = str(base)
        print(f"   base: {base}")
        step0_metrics = out / "step0" / "metrics.json"
        if step0_metrics.is_file():
            print("   reusing the step-0 scores")
            step0 = json.loads(step0_metrics.read_text())
        else:
            step0 = sample_and_score(export_step0(base, train_config, out / "step0" / "model"), step0_requests, config.sample, config.data.resolution, out / "step0" / "samples")
            step0_metrics.write_text(json.dumps(step0, indent=2) + "\n")
        print(format_table(step0))

    limit = ""
    if config.time_budget_s:
        elapsed = time.perf_counter() - job_start
        left = config.time_budget_s - elapsed - config.sampling_reserve_s
        if left <= 0:
            raise SystemExit(
                f"the data, base and step-0 stages took {elapsed:.0f} s of the {config.time_budget_s:g} s budget, leaving "
                "no time to train: raise --config.time_budget_s or set it to 0 to train num_steps"
            )
        train_config.train.time_limit_s = left
        limit = f" or {left:.0f} s, whichever comes first"
    with Stage(f"3/5 LayerDiff fine-tuning: {train_config.train.num_steps} steps{limit}, batch {train_config.train.per_host_batch_size}", timings, "train_s"):
        result = train(train_config, out / "train")
        if result.out_of_time:
            print(f"   stopped at step {result.step} to leave time for sampling")

    with Stage(f"4/5 sampling {len(requests)} requests with 2, 3 and 4 layers: {config.sample.steps} DDIM steps, guidance {config.sample.guidance}", timings, "sample_and_evaluate_s"):
        metrics = sample_and_score(result.model_dir, requests, config.sample, config.data.resolution, out / "samples")

    timings["total_s"] = round(time.perf_counter() - job_start, 1)
    losses = [row["loss"] for row in read_metrics(out / "train") if "loss" in row]
    metrics["step0"] = {"groups": step0["groups"]}
    metrics["demo"] = {
        "base": str(base),
        "timings_s": timings,
        "train_steps": result.step,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "config": json.loads(config.to_json_best_effort()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print("\n== 5/5 prompt following on the held-out requests\nbefore fine-tuning (step 0):\n" + format_table(step0))
    print(f"\nafter {result.step} fine-tuning steps:\n" + format_table(metrics))
    print(f"\nresults in {out}: samples/ (one folder per sample, contact_sheet.png), train/model/ (the fine-tuned model),")
    print(f"step0/ (the same before fine-tuning), metrics.json. Total {timings['total_s']:.0f} s, peak memory {metrics['demo']['peak_rss_gib']:.1f} GiB.")
    return metrics
