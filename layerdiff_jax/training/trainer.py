"""`train(config, workdir)`: the LayerDiff training loop, in the order it runs.

1. mesh        devices -> (data, fsdp, tensor) mesh; batch sizes checked against it
2. model       SD folder (or the toy SD) -> frozen VAE + text encoder, LayerDiff module, tokenizer; or, with
               config.model.kind "text_to_image", SD's UNet and text encoder trained on flat images
3. data        grain loader over the built (or synthetic) dataset; one loader batch = one step's micro-batches
4. state       restored from the latest checkpoint, or initialised from SD, placed with the program's shardings
5. step        the jitted train step (`step.py`); the model, state shardings and step come from
               `program.build_train_program`, which `layerdiff_jax.aot` compiles for TPU slices ahead of time
6. loop        steps, metrics, checkpoints, sample grids, SIGTERM / Ctrl-C, the time limit, non-finite loss
7. finish      last checkpoint, model folder export (`workdir/model/`)

Everything the run writes lives in `workdir`, which one run at a time may use (its main process holds the
folder's lock): checkpoints/, model/, metrics.jsonl, tensorboard/, config.json, samples/ when sample grids are
on, and toy_sd/ or data/ when the config asks for the toy SD or the synthetic dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from layerdiff_jax.convert.clip_text import load_text_encoder
from layerdiff_jax.convert.model_folder import load_scheduler_config
from layerdiff_jax.convert.sd_folder import CONVERSION_RECORD
from layerdiff_jax.convert.unet import load_unet
from layerdiff_jax.convert.vae import load_vae
from layerdiff_jax.data.loader import make_dataloader, parse_flat_views
from layerdiff_jax.data.synthetic import parse_layer_mix
from layerdiff_jax.data.tfds_builders import build_synthetic, find_dataset_dir, open_data_source
from layerdiff_jax.data.tokenizer import load_tokenizer
from layerdiff_jax.fileio import OutputFolderError, folder_lock
from layerdiff_jax.mesh import gather_to_host, global_batch, make_mesh, put_global
from layerdiff_jax.models.layerdiff import init_from_sd
from layerdiff_jax.models.vae import encode_layers
from layerdiff_jax.toy import make_toy_sd
from layerdiff_jax.training.autoencoder import VAEFitConfig, fit_toy_vae
from layerdiff_jax.training.checkpoint import Checkpointer, StopRequest
from layerdiff_jax.training.config import (
    SYNTHETIC_DATA,
    TOY_SD,
    ConfigError,
    validate_config,
)
from layerdiff_jax.training.export import (
    export_model,
    export_text_to_image,
    recorded_sampling,
)
from layerdiff_jax.training.metric_writer import MetricWriter, read_metrics
from layerdiff_jax.training.samples import data_requests, write_sample_grid
from layerdiff_jax.training.latent_cache import LatentCache, cache_bytes, check_fits
from layerdiff_jax.training.program import ModelConfigs, build_train_program
from layerdiff_jax.training.state import state_initializer
from layerdiff_jax.training.step import loss_reads_masks, scheduler_from_config

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without saving that state."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # optimizer updates done
    stopped_early: bool  # by SIGTERM / Ctrl-C / preemption, after saving a checkpoint
    out_of_time: bool  # stopped at config.train.time_limit_s, after saving a checkpoint
    model_dir: Path | None  # the exported LayerDiff model (or SD) folder; None on processes other than the main one
    state: Any  # the final TrainState (global arrays on the mesh)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_sd(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The SD folder to train from; "toy" writes (once) a toy SD folder in the workdir, its VAE fitted on the
    synthetic world when config.model.toy_vae.steps > 0."""
    sd_path = config.model.sd_path
    if sd_path == TOY_SD:
        folder = workdir / "toy_sd"
        if jax.process_index() == 0 and not (folder / CONVERSION_RECORD).is_file():
            fit, vae = config.model.toy_vae, {}
            if fit.steps:
                fit_config = VAEFitConfig(
                    steps=fit.steps, batch_size=fit.batch_size, crop=fit.crop, min_content=fit.min_content,
                    learning_rate=fit.learning_rate, kl_weight=fit.kl_weight, seed=config.seed,
                )
                params, scale = fit_toy_vae(
                    fit_config, num_samples=fit.num_samples, data_seed=config.data.synthetic.seed, resolution=config.data.resolution
                )
                vae = {"params": {"vae": params}, "vae_scaling_factor": scale}
            make_toy_sd(folder, seed=config.seed, overwrite=True, **vae)
        _sync("toy_sd")
        return folder
    folder = Path(sd_path)
    if not folder.is_dir():
        raise ConfigError(
            f"config.model.sd_path={sd_path!r} is not a folder: give a converted or diffusers SD-1.x folder "
            "(convert a single-file checkpoint with scripts/convert_weights.py first) or 'toy'"
        )
    return folder


def prepare_data(data: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The built dataset folder; "synthetic" builds (once) the synthetic dataset in the workdir."""
    if data.path != SYNTHETIC_DATA:
        return find_dataset_dir(data.path)
    s = data.synthetic
    root = workdir / "data" / f"synthetic_r{data.resolution}_n{s.num_train}_s{s.seed}_{s.layer_mix.replace(':', '-').replace(',', '_')}"
    if jax.process_index() == 0 and not list(root.rglob("dataset_info.json")):
        build_synthetic(root, num_train=s.num_train, num_test=0, resolution=data.resolution, seed=s.seed, layer_mix=parse_layer_mix(s.layer_mix))
    _sync("synthetic_data")
    return find_dataset_dir(root)


def _check_scheduler(sd_path: Path, scheduler) -> None:
    """Warns when the SD folder was trained to predict something else than the config asks for: fine-tuning
    then has to relearn the output before it learns anything new."""
    base = load_scheduler_config(sd_path)
    if base.prediction_type != scheduler.prediction_type:
        log.warning(
            "%s was trained with prediction_type=%r, config.diffusion.prediction_type is %r",
            sd_path, base.prediction_type, scheduler.prediction_type,
        )


def _micro_batches(batch: dict[str, np.ndarray], accum: int, resolution: int, cache: LatentCache | None) -> dict[str, np.ndarray]:
    """A loader batch of accum x per-host samples -> arrays (accum, per-host batch, ...), with `latents` from
    `cache` in place of images and masks when there is one."""
    size = batch["images"].shape[-3:-1]
    if size != (resolution, resolution):
        raise ConfigError(f"the data's images are {size[0]}x{size[1]}, config.data.resolution is {resolution}")
    if cache is not None:
        batch = cache(batch)
    return {key: value.reshape(accum, -1, *value.shape[1:]) for key, value in batch.items()}


def _latent_cache(config: ml_collections.ConfigDict, program, vae_params, num_records: int) -> LatentCache:
    """The host's cache of its `num_records` records' latents, after checking that it fits in host memory."""
    vae = program.vae
    side = config.data.resolution // vae.config.downsample_factor
    channels = 2 * vae.config.latent_channels
    check_fits(cache_bytes(num_records, config.model.layerdiff.max_layers, side, channels, np.float32), f"{num_records} records")
    return LatentCache(
        lambda params, images, masks: encode_layers(vae, params, images, masks), vae_params,
        keep_masks=loss_reads_masks(config),
    )


def _time_limit(train_cfg: ml_collections.ConfigDict, log_every: int):
    """step -> whether the run is out of time; every process answers alike at the same step."""
    if not train_cfg.time_limit_s:
        return lambda step: False
    deadline = time.monotonic() + train_cfg.time_limit_s
    if jax.process_count() == 1:
        return lambda step: time.monotonic() >= deadline
    # Process 0's clock decides, asked on log steps only: the broadcast waits for the devices.
    return lambda step: step % log_every == 0 and bool(multihost_utils.broadcast_one_to_all(time.monotonic() >= deadline))


@contextlib.contextmanager
def _workdir_lock(workdir: Path) -> Iterator[None]:
    """One run per workdir: the main process holds its lock (`fileio.folder_lock`) for the whole run, and every
    process learns whether it could, before any work."""
    problem = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                stack.enter_context(folder_lock(workdir, "train.py"))
            except OutputFolderError as e:
                problem = str(e)
        if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(problem is None)):
            problem = problem or f"process 0 could not lock the workdir {workdir}"
        if problem:
            raise OutputFolderError(problem)
        yield


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, resume: bool = True) -> TrainResult:
    """Trains as `config` says, writing everything under `workdir` (which one run at a time may use)."""
    workdir = Path(workdir).absolute()
    with _workdir_lock(workdir):
        return _train(config, workdir, resume)


def _train(config: ml_collections.ConfigDict, workdir: Path, resume: bool) -> TrainResult:
    run_start = time.perf_counter()
    config = validate_config(config)
    out_of_time = _time_limit(config.train, config.log.every_steps)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    train_cfg = config.train

    # 1. Mesh.
    mesh = make_mesh(config.mesh.shape)
    log.info("mesh %s over %d device(s) in %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())

    # 2. Model: the VAE and text encoder (frozen, except a text-to-image model's text encoder), the trained
    # module (LayerDiff, or SD's UNet with its text encoder), the tokenizer; with the optimizer, the abstract state
    # and its shardings and the jitted step (5.), as `layerdiff_jax.aot` compiles them ahead of time.
    sd_path = prepare_sd(config, workdir)
    dtype = jnp.dtype(config.model.compute_dtype)
    impl = config.model.attention_impl
    _, vae_params = load_vae(sd_path / "vae", dtype=dtype, attention_impl=impl)
    _, text_params = load_text_encoder(sd_path / "text_encoder", dtype=dtype, attention_impl=impl)
    models = ModelConfigs.from_folder(sd_path)
    tokenizer = load_tokenizer(sd_path)
    scheduler = scheduler_from_config(config.diffusion)  # recorded with the model, so sampling matches training
    _check_scheduler(sd_path, scheduler)
    program = build_train_program(config, mesh, models, token_length=tokenizer.max_length, processes=jax.process_count())
    model, vae, text_encoder, tx, layered = program.model, program.vae, program.text_encoder, program.tx, program.layered

    # 3. Data: each loader batch holds one step's micro-batches for this host.
    data_path = prepare_data(config.data, workdir)
    source = open_data_source(data_path, config.data.split)
    cache = _latent_cache(config, program, vae_params, len(source) // jax.process_count()) if train_cfg.cache_latents else None
    loader = make_dataloader(
        source,
        batch_size=train_cfg.per_host_batch_size * train_cfg.grad_accum_steps,
        max_layers=config.model.layerdiff.max_layers,
        tokenizer=tokenizer,
        seed=config.seed,
        split=config.data.split,
        worker_count=config.data.worker_count,
        flat_views=None if layered else parse_flat_views(config.data.flat_views),
        with_keys=cache is not None,
    )
    data_iterator = iter(loader)

    # 4. State: restored, or initialised from SD, with the program's shardings.
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    abstract, state_shardings = program.abstract_state, program.state_shardings
    frozen_params = {"vae": vae_params}
    if layered:
        frozen_params["text_encoder"] = text_params
    frozen = put_global(frozen_params, program.frozen_shardings)
    # What a dropped prompt becomes: the empty prompt's embedding, or its token ids for a trained text encoder.
    empty_prompt = jax.jit(text_encoder.apply)({"params": text_params}, tokenizer([""]))[0] if layered else tokenizer([""])[0]
    empty_prompt = put_global(np.asarray(empty_prompt), NamedSharding(mesh, PartitionSpec()))

    checkpointer = Checkpointer(
        workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
    )
    start = checkpointer.latest_step()
    if start is not None and not resume:
        raise FileExistsError(f"{checkpointer.directory} holds checkpoints (latest step {start}); resume, or use another workdir")
    restored = checkpointer.restore_latest(abstract, data_iterator) if start is not None else None
    if restored is not None:
        start, state = restored
        log.info("resuming from step %d (%s)", start, checkpointer.directory)
    else:
        start = 0
        unet, unet_params = load_unet(sd_path / "unet", dtype=dtype, attention_impl=impl, remat=config.model.remat)
        if layered:
            _, params = init_from_sd(unet, unet_params, model.config, init_rng)
        else:
            params = {"text_encoder": text_params, "unet": unet_params}
        del unet_params
        initialize = state_initializer(state_shardings, train_rng, tx=tx, ema=train_cfg.ema)
        state = initialize(put_global(params, state_shardings.params))
        del params

    # 5. Step: the program's.
    train_step = program.step

    # 6. Loop. The loss of step n is read after step n+1 is dispatched, so the host never stalls the
    # devices, except before a checkpoint or a sample grid, made only from a state whose loss was finite.
    writer = MetricWriter(workdir, enabled=is_main)
    sample_requests = (
        data_requests(data_path, config.data.split, config.log.sample_count, config.model.layerdiff.max_layers)
        if config.log.sample_every_steps else []
    )

    def write_samples(step: int) -> None:
        """A grid of samples from the current (EMA) parameters; every process gathers, the main one samples."""
        params = gather_to_host(state.ema_params if train_cfg.ema else state.params)
        if is_main:
            image = write_sample_grid(
                workdir / "samples" / f"step_{step:07d}.png",
                {"unet": model, "vae": vae, "text_encoder": text_encoder},
                {"unet": params, "vae": vae_params, "text_encoder": text_params},
                tokenizer,
                scheduler,
                sample_requests,
                steps=config.log.sample_steps,
                guidance=config.log.sample_guidance,
                size=config.data.resolution,
                seed=config.seed,
            )
            writer.write_image(step, "samples", image)

    progress = tqdm(total=train_cfg.num_steps, initial=start, disable=not is_main, desc="train", unit="step", dynamic_ncols=True)
    interval: list[dict[str, float]] = []  # host metrics of the steps since the last log line
    interval_start = time.perf_counter()
    # Wall time of the whole run, resumed segments included: what the metrics rows call elapsed_s.
    earlier = [row["elapsed_s"] for row in read_metrics(workdir) if row["step"] <= start and "elapsed_s" in row]
    elapsed_before = earlier[-1] if earlier else 0.0
    unchecked: tuple[int, dict] | None = None  # (step, device metrics) not read yet

    def check_and_log(step: int, metrics: dict) -> None:
        nonlocal interval_start
        values = {key: float(value) for key, value in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
            checkpointer.wait()
            last = checkpointer.latest_step()
            where = f"the last good checkpoint is step {last} in {checkpointer.directory}" if last is not None else "no checkpoint was written"
            raise NonFiniteLossError(
                f"loss is {values['loss']} at step {step}: stopping without saving this state; {where}. "
                "Lower config.train.learning_rate or check the data, then rerun to resume from that checkpoint."
            )
        interval.append(values)
        if step % config.log.every_steps == 0 or step == train_cfg.num_steps:
            means = {key: float(np.mean([v[key] for v in interval])) for key in values}
            means["steps_per_sec"] = len(interval) / max(time.perf_counter() - interval_start, 1e-9)
            means["elapsed_s"] = round(elapsed_before + time.perf_counter() - run_start, 1)
            writer.write(step, means)
            progress.set_postfix(loss=f"{means['loss']:.4f}", steps_per_s=f"{means['steps_per_sec']:.2f}")
            interval.clear()
            interval_start = time.perf_counter()

    step, stopped_early, timed_out = start, False, False
    try:
        with StopRequest(checkpointer) as stop_requested:
            while step < train_cfg.num_steps:
                batch = _micro_batches(next(data_iterator), train_cfg.grad_accum_steps, config.data.resolution, cache)
                state, metrics = train_step(state, global_batch(batch, mesh, sample_axis=1), frozen, empty_prompt)
                step += 1
                progress.update(1)
                if unchecked is not None:
                    check_and_log(*unchecked)
                unchecked = (step, metrics)
                stopped_early = stop_requested(step)
                timed_out = not stopped_early and step < train_cfg.num_steps and out_of_time(step)
                save = stopped_early or timed_out or step % config.checkpoint.every_steps == 0 or step == train_cfg.num_steps
                sample = bool(config.log.sample_every_steps) and step % config.log.sample_every_steps == 0
                if save or sample:
                    check_and_log(*unchecked)
                    unchecked = None
                if save:
                    checkpointer.save(step, state, data_iterator)
                if stopped_early or timed_out:
                    why = "on request" if stopped_early else f"at the time limit ({train_cfg.time_limit_s:g} s)"
                    log.warning("stopped at step %d %s; checkpoint saved", step, why)
                    break
                if sample:
                    write_samples(step)
            if unchecked is not None:
                check_and_log(*unchecked)

        # 7. Finish: wait for the checkpoint, export the model folder.
        checkpointer.wait()
        params = gather_to_host(state.ema_params if train_cfg.ema else state.params)
        export = export_model if layered else export_text_to_image
        # The LayerDiff folder records the training resolution (sampling's default size) and, if the config says
        # so, the sampling settings the run was validated with (sampling's default steps and guidance).
        size = config.data.resolution // vae.config.downsample_factor
        recorded = {"sample_size": size, "sampling": recorded_sampling(config)} if layered else {}
        model_dir = export(workdir / "model", sd_path, model, params, scheduler, **recorded) if is_main else None
        _sync("export")
        if is_main:
            log.info("model folder written: %s", model_dir)
        return TrainResult(step=step, stopped_early=stopped_early, out_of_time=timed_out, model_dir=model_dir, state=state)
    finally:
        progress.close()
        writer.close()
        checkpointer.wait()
        checkpointer.close()

