"""The training config: its schema, the paper's values, and validation that names the bad field.

`base_config()` lists every field the trainer reads, set to the paper's training settings; `configs/*.py` start from it and change what differs. `validate_config` runs before anything
is loaded or compiled: an unknown or missing field, a value of the wrong type or out of range raises
`ConfigError` naming the field (`config.train.learning_rate must be > 0, got -1.0`).

Units: a *step* is one optimizer update. Each step consumes `train.grad_accum_steps` micro-batches of
`train.per_host_batch_size` samples on every host, so the batch per update is
per_host_batch_size x processes x grad_accum_steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from layerdiff_jax.data.loader import FLAT_VIEWS, parse_flat_views
from layerdiff_jax.data.synthetic import parse_layer_mix
from layerdiff_jax.diffusion.schedules import BETA_SCHEDULES, PREDICTION_TYPES
from layerdiff_jax.diffusion.settings import MAX_IMAGE_SIDE
from layerdiff_jax.models.attention import ATTENTION_IMPLS
from layerdiff_jax.models.layerdiff import PROMPT_ENHANCER_VARIANTS, LayerDiffConfig
from layerdiff_jax.sharding import MESH_AXES

COMPUTE_DTYPES = ("float32", "bfloat16")
MODEL_KINDS = ("layerdiff", "text_to_image")
TOY_SD = "toy"  # model.sd_path: write and train on the toy SD (layerdiff_jax.toy)
SYNTHETIC_DATA = "synthetic"  # data.path: build the synthetic dataset in the workdir
# The loader pads every sample to max_layers layers and every step runs the UNet on all of them, so memory and
# time grow with it: 64, 16x the paper's 4, is past any layered image, and a larger value a typo.
MAX_LAYERS = 64
# Training draws its sample grids as one batch, next to the training state in memory.
MAX_GRID_SAMPLES = 64


class ConfigError(ValueError):
    """A config field is unknown, missing, of the wrong type or out of range."""


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, at the paper's settings. `model.sd_path` and `data.path` must be set."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameters of new modules, data order, noise, dropout

    c.model = ml_collections.ConfigDict()
    # "layerdiff": LayerDiff from an SD folder (the paper). "text_to_image": SD's own objective on flat images
    # (no masks, no layers), training the UNet and the text encoder of the SD folder: how the toy base is made.
    c.model.kind = "layerdiff"
    c.model.sd_path = ""  # an SD-1.x folder (converted or diffusers) or "toy"
    # With sd_path "toy": fit the toy VAE for this many steps on the synthetic world first (0: a random VAE).
    c.model.toy_vae = ml_collections.ConfigDict()
    c.model.toy_vae.steps = 0
    c.model.toy_vae.num_samples = 600  # synthetic samples (seed data.synthetic.seed) whose layers and masks it sees
    c.model.toy_vae.batch_size = 16
    c.model.toy_vae.crop = 32  # random square crops of the images
    c.model.toy_vae.min_content = 0.05  # crops with this share of non-black pixels are drawn 10x as often
    c.model.toy_vae.learning_rate = 3e-3
    c.model.toy_vae.kl_weight = 1e-6
    c.model.layerdiff = ml_collections.ConfigDict(dataclasses.asdict(LayerDiffConfig()))
    c.model.compute_dtype = "float32"  # parameters and optimizer state stay float32
    c.model.attention_impl = "auto"  # layerdiff_jax/models/attention.py: the fused kernel on CPUs, XLA elsewhere
    c.model.remat = False  # rematerialise UNet resnets/transformers in the backward pass

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a built tfds dataset folder (scripts/build_dataset.py) or "synthetic"
    c.data.split = "train"
    c.data.resolution = 256  # the images' side in pixels; checked against the data
    c.data.worker_count = 0  # grain decoding processes per host (0: in the training process)
    c.data.synthetic = ml_collections.ConfigDict()  # used when data.path == "synthetic"
    c.data.synthetic.num_train = 1000
    c.data.synthetic.seed = 0
    c.data.synthetic.layer_mix = "2:0.34,3:0.33,4:0.33"  # total layers (background included): weight
    # model.kind "text_to_image": what each record shows, one flat image and its prompt (data/loader.py).
    c.data.flat_views = "composite:0.4,background:0.1,object:0.5"

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.beta_schedule = "scaled_linear"
    c.diffusion.prediction_type = "epsilon"  # the model's output, as SD 1.5's: "epsilon", "v_prediction" or "sample"
    c.diffusion.p_shared_timestep = 0.5  # else every layer draws its own t
    c.diffusion.noise_offset = 0.0  # per-image, per-channel noise added to the training noise (0: as SD trains)
    c.diffusion.min_snr_gamma = 0.0  # Min-SNR-gamma loss weights per timestep (0: plain MSE, as the paper trains)
    # A foreground layer's image-latent error inside its mask weighted 1 + w against 1 outside it, each layer's weights
    # scaled to mean 1 (0: plain MSE, as the paper trains).
    c.diffusion.object_loss_weight = 0.0
    # The noisiest late_portion of the timesteps drawn late_multiplier times as often as the rest (1: uniform,
    # as the paper trains).
    c.diffusion.timestep_bias_portion = 0.25
    c.diffusion.timestep_bias_multiplier = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100_000  # optimizer updates
    # The paper: "batch 32 with 8 steps of gradient accumulation", read as 32 samples per update.
    c.train.per_host_batch_size = 4  # samples per micro-batch on each host
    c.train.grad_accum_steps = 8
    c.train.learning_rate = 1e-5
    c.train.warmup_steps = 500  # linear from 0, then constant
    c.train.cooldown_steps = 0  # then linear to 0 over the last this many of num_steps (0: constant to the end)
    c.train.weight_decay = 1e-4
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.grad_clip_norm = 1.0  # global norm; 0 turns clipping off
    c.train.global_prompt_dropout = 0.1  # per sample: the global prompt becomes ""
    c.train.layer_prompt_dropout = 0.1  # per sample: every layer prompt becomes ""
    c.train.sample_posterior = True  # VAE latents drawn from the posterior (as SD trains), else its mean
    # Encode each record's layers and masks once and keep the latents in host memory (training/latent_cache.py);
    # needs sample_posterior False. Worth it where the VAE is a large share of the step and records repeat (toy models).
    c.train.cache_latents = False
    c.train.ema = False
    c.train.ema_decay = 0.9999
    # XLA:CPU runs convolutions through YNNPACK by default; False leaves them to XLA's own kernels, whose
    # gradients are faster for small convolutions such as the toy models' (docs/experiments.md). No effect elsewhere.
    c.train.cpu_ynn_convolutions = True
    # Stop once the run has lasted this long (set-up and compilation included), with a checkpoint and the model
    # folder as on SIGTERM; a rerun resumes for another time_limit_s. 0: train num_steps.
    c.train.time_limit_s = 0.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50  # progress bar, TensorBoard and metrics.jsonl
    c.log.sample_every_steps = 0  # sample grids (<workdir>/samples/, TensorBoard) from the current model; 0: off
    c.log.sample_count = 4  # prompts of the first training samples
    c.log.sample_steps = 50  # DDIM steps
    c.log.sample_guidance = 3.0
    # Record sample_steps and sample_guidance in the exported LayerDiff model folder (sampling.json) as the settings
    # sampling and editing default to: set it when they are the settings the run was validated with.
    c.log.record_sample_settings = False
    return c


@dataclasses.dataclass(frozen=True)
class _Rule:
    check: Callable[[Any], bool]
    requirement: str


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _probability(v):
    return 0.0 <= v <= 1.0


def _one_of(options):
    return _Rule(lambda v: v in options, f"must be one of {tuple(options)}")


def _mesh_shape(shape):
    sizes_ok = all(isinstance(n, int) and not isinstance(n, bool) and (n > 0 or n == -1) for n in shape)
    return len(shape) == len(MESH_AXES) and sizes_ok and list(shape).count(-1) <= 1


def _layer_mix(text):
    try:
        parse_layer_mix(text)
    except ValueError:
        return False
    return True


def _flat_views(text):
    try:
        parse_flat_views(text)
    except ValueError:
        return False
    return True


_POSITIVE = _Rule(_positive, "must be > 0")
_NON_NEGATIVE = _Rule(_non_negative, "must be >= 0")
_PROBABILITY = _Rule(_probability, "must be in [0, 1]")

RULES: dict[str, _Rule] = {
    "model.kind": _one_of(MODEL_KINDS),
    "model.toy_vae.steps": _NON_NEGATIVE,
    "model.toy_vae.num_samples": _POSITIVE,
    "model.toy_vae.batch_size": _POSITIVE,
    "model.toy_vae.crop": _POSITIVE,
    "model.toy_vae.min_content": _PROBABILITY,
    "model.toy_vae.learning_rate": _POSITIVE,
    "model.toy_vae.kl_weight": _NON_NEGATIVE,
    "model.sd_path": _Rule(bool, 'must be set: an SD-1.x folder (converted or diffusers) or "toy"'),
    "model.layerdiff.max_layers": _Rule(lambda v: 2 <= v <= MAX_LAYERS, f"must be in [2, {MAX_LAYERS}] (a background, 1+ foregrounds)"),
    "model.layerdiff.prompt_enhancer": _one_of(PROMPT_ENHANCER_VARIANTS),
    "model.layerdiff.enhancer_heads": _POSITIVE,
    "model.compute_dtype": _one_of(COMPUTE_DTYPES),
    "model.attention_impl": _one_of(ATTENTION_IMPLS),
    "data.path": _Rule(bool, 'must be set: a built dataset folder or "synthetic"'),
    "data.split": _Rule(bool, "must be a split name"),
    "data.resolution": _Rule(lambda v: 0 < v <= MAX_IMAGE_SIDE, f"must be in [1, {MAX_IMAGE_SIDE}] (pixels)"),
    "data.worker_count": _NON_NEGATIVE,
    "data.synthetic.num_train": _POSITIVE,
    "data.synthetic.layer_mix": _Rule(_layer_mix, "must be 'layers:weight,...' with 1 to 4 layers, e.g. '2:0.5,3:0.5'"),
    "data.flat_views": _Rule(_flat_views, f"must be 'view:weight,...' with views from {FLAT_VIEWS}"),
    "diffusion.num_train_timesteps": _POSITIVE,
    "diffusion.beta_start": _POSITIVE,
    "diffusion.beta_end": _POSITIVE,
    "diffusion.beta_schedule": _one_of(BETA_SCHEDULES),
    "diffusion.prediction_type": _one_of(PREDICTION_TYPES),
    "diffusion.p_shared_timestep": _PROBABILITY,
    "diffusion.noise_offset": _NON_NEGATIVE,
    "diffusion.min_snr_gamma": _NON_NEGATIVE,
    "diffusion.object_loss_weight": _NON_NEGATIVE,
    "diffusion.timestep_bias_portion": _Rule(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"),
    "diffusion.timestep_bias_multiplier": _POSITIVE,
    "train.num_steps": _POSITIVE,
    "train.per_host_batch_size": _POSITIVE,
    "train.grad_accum_steps": _POSITIVE,
    "train.learning_rate": _POSITIVE,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.cooldown_steps": _NON_NEGATIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.adam_b1": _Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "train.adam_b2": _Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "train.adam_eps": _POSITIVE,
    "train.grad_clip_norm": _NON_NEGATIVE,
    "train.global_prompt_dropout": _PROBABILITY,
    "train.layer_prompt_dropout": _PROBABILITY,
    "train.ema_decay": _Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "train.time_limit_s": _NON_NEGATIVE,
    "mesh.shape": _Rule(_mesh_shape, f"must be {len(MESH_AXES)} positive ints {MESH_AXES}, at most one of them -1"),
    "checkpoint.every_steps": _POSITIVE,
    "checkpoint.max_to_keep": _POSITIVE,
    "log.every_steps": _POSITIVE,
    "log.sample_every_steps": _NON_NEGATIVE,
    "log.sample_count": _Rule(lambda v: 0 < v <= MAX_GRID_SAMPLES, f"must be in [1, {MAX_GRID_SAMPLES}] (a grid, sampled as one batch)"),
    "log.sample_steps": _POSITIVE,
    "log.sample_guidance": _NON_NEGATIVE,
}


def _same_type(value, reference) -> bool:
    if isinstance(reference, bool):
        return isinstance(value, bool)
    if isinstance(reference, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(reference, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(reference, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(reference))


def check_fields(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "") -> None:
    """ConfigError unless `config` has exactly `reference`'s fields, each of the same type (groups recursively)."""
    unknown = sorted(set(config.keys()) - set(reference.keys()))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(prefix + k for k in unknown)}")
    missing = sorted(set(reference.keys()) - set(config.keys()))
    if missing:
        raise ConfigError(f"missing config field(s): {', '.join(prefix + k for k in missing)}")
    for key in reference.keys():
        value, ref = config[key], reference[key]
        if isinstance(ref, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{prefix}{key} must be a group of fields, got {value!r}")
            check_fields(value, ref, f"{prefix}{key}.")
        elif not _same_type(value, ref):
            raise ConfigError(f"config.{prefix}{key} must be of type {type(ref).__name__}, got {value!r}")
        elif isinstance(ref, float) and not math.isfinite(value):
            raise ConfigError(f"config.{prefix}{key} must be a finite number, got {value!r}")


def _get(config: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns `config` unchanged if every field is known, present, typed and in range; else ConfigError."""
    check_fields(config, base_config(), "")
    for name, rule in RULES.items():
        value = _get(config, name)
        if not rule.check(value):
            raise ConfigError(f"config.{name} {rule.requirement}, got {value!r}")
    if config.diffusion.beta_end <= config.diffusion.beta_start:
        raise ConfigError(
            f"config.diffusion.beta_end ({config.diffusion.beta_end}) must exceed beta_start ({config.diffusion.beta_start})"
        )
    if config.model.kind == "text_to_image" and config.log.sample_every_steps:
        raise ConfigError("config.log.sample_every_steps: sample grids are drawn by LayerDiff models only; set it to 0")
    _check_together(config)
    try:
        LayerDiffConfig(**config.model.layerdiff)
    except ValueError as e:
        raise ConfigError(f"config.model.layerdiff: {e}") from None
    return config


def _check_together(config: ml_collections.ConfigDict) -> None:
    """Fields in range alone but not together: found now rather than after the data is built and the model compiled."""
    if config.log.sample_steps > config.diffusion.num_train_timesteps:
        raise ConfigError(
            f"config.log.sample_steps={config.log.sample_steps} exceeds config.diffusion.num_train_timesteps="
            f"{config.diffusion.num_train_timesteps}: DDIM steps are a subset of the training timesteps"
        )
    if config.data.path == SYNTHETIC_DATA:
        s = config.data.synthetic
        if config.train.per_host_batch_size > s.num_train:
            raise ConfigError(
                f"config.train.per_host_batch_size={config.train.per_host_batch_size} exceeds config.data.synthetic."
                f"num_train={s.num_train}: a batch needs that many samples"
            )
        most = max(n for n, weight in parse_layer_mix(s.layer_mix).items() if weight > 0)
        if config.model.kind == "layerdiff" and most > config.model.layerdiff.max_layers:
            raise ConfigError(
                f"config.data.synthetic.layer_mix draws samples of {most} layers, more than config.model.layerdiff."
                f"max_layers={config.model.layerdiff.max_layers}"
            )
    if config.train.cache_latents and (config.train.sample_posterior or config.model.kind != "layerdiff"):
        raise ConfigError(
            "config.train.cache_latents keeps one latent per record: it needs config.train.sample_posterior=False "
            "and config.model.kind='layerdiff' (text-to-image training draws a new view of each record every time)"
        )
    fit = config.model.toy_vae
    if config.model.sd_path == TOY_SD and fit.steps and fit.crop > config.data.resolution:
        raise ConfigError(
            f"config.model.toy_vae.crop={fit.crop} exceeds config.data.resolution={config.data.resolution}: it crops those images"
        )
