#!/usr/bin/env python
"""Compiles the train step or the batch sampler for a TPU slice or GPU node ahead of time, here, and reports what fits.

  python scripts/compile_aot.py --list-slices
  python scripts/compile_aot.py train --config configs/tpu_v4.py --slice v4-32 [--batch-per-chip 2] [--find-max-batch]
  python scripts/compile_aot.py train --config configs/shapes_cpu.py --slice v4-8 --profile-compile /tmp/trace
  python scripts/compile_aot.py sample --slice v5e-256 --size 512 --layers 4 --steps 50 [--config ...] [--find-max-batch]
  python scripts/compile_aot.py train --config configs/gpu_h100.py --slice h100-1   # in a venv with the gpu-aot extra

No TPU or GPU is needed: libtpu (pip install -e ".[tpu]") describes a TPU slice, jax's CUDA plugin without the CUDA
libraries (pip install -e ".[gpu-aot]", best in a virtual environment of its own) a node of NVIDIA GPUs, and XLA
compiles for it here (layerdiff_jax/aot). train compiles the trainer's own step for --config (override fields with
--config.<field>=<value>) on the config's mesh over the slice's chips, each host loading
config.train.per_host_batch_size samples per micro-batch, or --batch-per-chip. sample compiles the sampler's guided
DDIM and decode programs, data parallel over every chip. The components' architectures are config.model.sd_path's
when that folder exists here, the toy SD's for "toy", else SD 1.5's (sample without --config: SD 1.5's with the
paper's LayerDiff).

Prints one table: per-chip memory against what a program may use (a TPU chip's HBM; a GPU's memory times
XLA_PYTHON_CLIENT_MEM_FRACTION, JAX's default 0.75, as the GPU run reads it), FLOPs, collectives, ideal times at the
chips' peak rates (estimates, not measurements), compile time; --json PATH writes it all. --find-max-batch compiles
candidates to find the largest batch per chip that fits. A compile of SD-1.5-size programs takes minutes per
candidate, with ~20 GB of host memory for a TPU slice, ~5 GB for a GPU; --profile-compile DIR (TPU slices) traces it
and prints where that time went (layerdiff_jax/aot/compile_profile.py); the trace slows the compile, so time one
without it.

Exit status: 0 when the programs fit; 1 when they do not (the line names the bytes over and, with --find-max-batch,
the largest batch that fits) or do not compile for the slice (the line says why); 2 on bad input, refused before
anything is compiled: an unknown slice (the known ones are listed), libtpu or the CUDA plugin missing (the install
command is given), a config whose mesh does not divide the slice's chips, a bad flag or config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from layerdiff_jax.cli import absl_flags_parser, attach_package_log, config_problem

TOOL = "compile_aot.py"
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py); train needs one", lock_config=True)
_SLICE = flags.DEFINE_string("slice", None, "TPU slice or GPU node, e.g. v4-32, h100-8 (--list-slices lists them)")
_LIST = flags.DEFINE_bool("list-slices", False, "list the known slices and their chips' figures")
_BATCH = flags.DEFINE_integer("batch-per-chip", None, "samples per chip (train: per micro-batch); default the config's (train), 1 (sample)", lower_bound=1)
_FIND = flags.DEFINE_bool("find-max-batch", False, "compile candidates to find the largest batch per chip that fits")
_JSON = flags.DEFINE_string("json", None, "write the report as JSON to this file")
_PROFILE = flags.DEFINE_string(
    "profile-compile", None, "TPU slices: trace the compile into this folder and print where its time went (phases, slowest instructions)"
)
_SIZE = flags.DEFINE_integer("size", None, "sample: image side in pixels (default: the config's data.resolution, else 512)", lower_bound=1)
_LAYERS = flags.DEFINE_integer("layers", None, "sample: layers, background included (default: the model's max_layers)", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 50, "sample: DDIM steps", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "sample: compute dtype (scripts/sample.py runs float32)")


class BadInput(Exception):
    """Input refused before compiling: one line, exit status 2."""


def list_slices() -> str:
    from layerdiff_jax.aot.analysis import gib
    from layerdiff_jax.aot.slices import SLICES

    lines = [f"{'slice':9} {'topology':11} {'chips':>5} {'hosts':>5} {'HBM/chip':>11} {'bf16/chip':>12} {'HBM BW':>10} {'link BW':>17}"]
    for s in SLICES.values():
        lines.append(
            f"{s.name:9} {s.topology_name:11} {s.chips:5d} {s.hosts:5d} {gib(s.hbm_bytes):>11} {s.peak_bf16_flops / 1e12:>8.0f} TF/s "
            f"{s.hbm_bytes_per_s / 1e9:>5.0f} GB/s {s.ici_bytes_per_s / 1e9:>5.0f} GB/s {s.interconnect}"
        )
    return "\n".join(lines)


def _config(required: bool):
    """The validated --config, or None without one where the command can go without."""
    from layerdiff_jax.training.config import validate_config

    if _CONFIG.value is None and required:
        raise BadInput("train needs --config, e.g. --config configs/tpu_v4.py")
    return None if _CONFIG.value is None else validate_config(_CONFIG.value)


def _config_path() -> str:
    return config_flags.get_config_filename(flags.FLAGS["config"])


def _train(s, config):
    """(settings, batch per chip, compile_at, samples per unit of batch per chip, unit) of the train step."""
    from layerdiff_jax.aot.train import TrainCompiler, batch_shards, config_batch_per_chip, mesh_shape, model_configs
    from layerdiff_jax.sharding import MESH_AXES

    shape = mesh_shape(config, s)
    batch = _BATCH.value or config_batch_per_chip(config, s)
    models, source = model_configs(config)
    compiler = TrainCompiler.create(config, s, models)
    train = config.train
    settings = {
        "config": _config_path(),
        "model": f"{config.model.kind} from {source}; {config.model.compute_dtype}, remat {'on' if config.model.remat else 'off'}, "
        f"attention {config.model.attention_impl}, EMA {'on' if train.ema else 'off'}",
        "mesh": " ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape)),
        "step": f"{config.data.resolution}x{config.data.resolution}, {config.model.layerdiff.max_layers} layers, "
        f"{train.grad_accum_steps} micro-batch(es) accumulated",
    }
    samples_per_batch = batch_shards(shape) * train.grad_accum_steps
    return settings, batch, lambda b: (compiler.compile(b),), samples_per_batch, "samples"


def _sample(s, config):
    """(settings, batch per chip, compile_at, samples per unit of batch per chip, unit) of the sampler's programs."""
    from layerdiff_jax.aot.sample import SampleCompiler, SampleSettings
    from layerdiff_jax.aot.train import model_configs
    from layerdiff_jax.diffusion.schedules import SchedulerConfig
    from layerdiff_jax.models.layerdiff import LayerDiffConfig
    from layerdiff_jax.training.program import ModelConfigs
    from layerdiff_jax.training.step import scheduler_from_config

    if config is None:
        models, source, layerdiff, scheduler, impl = ModelConfigs.sd15(), "SD 1.5", LayerDiffConfig(), SchedulerConfig(), "auto"
        size = _SIZE.value or 512
    else:
        (models, source), layerdiff = model_configs(config), LayerDiffConfig(**config.model.layerdiff)
        scheduler, impl, size = scheduler_from_config(config.diffusion), config.model.attention_impl, _SIZE.value or config.data.resolution
    settings = SampleSettings(size, _LAYERS.value or layerdiff.max_layers, _STEPS.value, _DTYPE.value, impl)
    compiler = SampleCompiler.create(s, models, layerdiff, scheduler, settings)
    described = {
        "model": f"LayerDiff from {source} (max_layers {layerdiff.max_layers}); {settings.dtype}, attention {impl}",
        "sampling": f"{size}x{size}, {settings.layers} layers, {settings.steps} DDIM steps, guidance with layer-aware negatives",
        "mesh": f"data={s.chips} (parameters replicated)",
    }
    if config is not None:
        described = {"config": _config_path(), **described}
    return described, _BATCH.value or 1, compiler.compile, s.chips, "images"


def run(command: str) -> int:
    from layerdiff_jax.aot.slices import SliceError, check_compiler, get_slice, usable_memory
    from layerdiff_jax.training.config import ConfigError

    if _SLICE.value is None:
        raise BadInput(f"{command} needs --slice (--list-slices lists them)")
    if _JSON.value and not Path(_JSON.value).absolute().parent.is_dir():
        raise BadInput(f"--json {_JSON.value}: its folder does not exist")
    if _PROFILE.value and Path(_PROFILE.value).exists() and not Path(_PROFILE.value).is_dir():
        raise BadInput(f"--profile-compile {_PROFILE.value}: not a folder")
    try:
        s = get_slice(_SLICE.value)
        if _PROFILE.value and s.platform != "tpu":
            raise BadInput(f"--profile-compile reads libtpu's trace events: it profiles TPU slices, not {s.name}")
        config = _config(required=command == "train")
        if command == "train":
            from layerdiff_jax.aot.train import mesh_shape

            mesh_shape(config, s)
        check_compiler(s)
        usable_memory(s)  # a bad XLA_PYTHON_CLIENT_MEM_FRACTION, refused now
        settings, batch, compile_at, samples_per_batch, unit = (_train if command == "train" else _sample)(s, config)
        return _compile(command, s, settings, batch, compile_at, samples_per_batch, unit)
    except ConfigError as e:
        raise BadInput(f"bad config: {e}") from None
    except SliceError as e:  # and settings the model cannot take, found before their compile starts
        raise BadInput(str(e)) from None


def _compile(command, s, settings, batch, compile_at, samples_per_batch, unit) -> int:
    from layerdiff_jax.aot import compile_profile

    if not _PROFILE.value:
        return _compile_and_report(command, s, settings, batch, compile_at, samples_per_batch, unit)
    sources: dict[str, str] = {}

    def compile_at_noting_sources(b: int):
        programs = compile_at(b)
        for p in programs:
            sources.update(p.op_names)
        return programs

    with compile_profile.traced(_PROFILE.value):
        status = _compile_and_report(command, s, settings, batch, compile_at_noting_sources, samples_per_batch, unit)
    print(f"\nwhere the compile went (trace in {_PROFILE.value}, opens in Perfetto):")
    print("\n".join(compile_profile.summary(_PROFILE.value, sources).lines()))
    return status


def _compile_and_report(command, s, settings, batch, compile_at, samples_per_batch, unit) -> int:
    from layerdiff_jax.aot.analysis import DoesNotFit, peak_rss_bytes
    from layerdiff_jax.aot.fit import largest_batch
    from layerdiff_jax.aot.slices import usable_memory
    from layerdiff_jax.aot.report import Report, table

    def compile_and_measure(b: int):
        programs = compile_at(b)
        return programs, max(p.memory.total for p in programs)

    search = None
    try:
        if _FIND.value:
            search = largest_batch(compile_and_measure, usable_memory(s)[0], start=batch)
            if search.batch is None:
                print(f"{TOOL}: {search.smallest_failure}, even at 1 per chip", file=sys.stderr)
                return 1
            batch, programs = search.batch, search.result
        else:
            programs = compile_at(batch)
    except DoesNotFit as e:
        print(f"{TOOL}: at {batch} per chip, {e}; --find-max-batch finds the largest batch that fits", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a program XLA or JAX cannot build for the slice, e.g. an unpartitionable kernel
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{TOOL}: the {command} programs do not compile for {s.name}: {type(e).__name__}: {reason}", file=sys.stderr)
        return 1
    per = "step" if command == "train" else "batch"
    report = Report(command, s, settings, batch, batch * samples_per_batch, unit, per, tuple(programs), search, peak_rss_bytes())
    print(table(report))
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


def main(argv: list[str]) -> int:
    # Where jax's CUDA plugin is installed without the CUDA libraries (the gpu-aot extra), it loads only without its
    # check of them; this tool runs nothing on a GPU, so the check has nothing to protect.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    attach_package_log(sys.stderr, f"{TOOL}: %(message)s", logging.INFO)
    logging.getLogger("layerdiff_jax").propagate = False  # once, not again through absl's handler
    logging.getLogger("jax").setLevel(logging.WARNING)  # not "Unable to initialize backend 'tpu'": no TPU is expected here
    if _LIST.value:
        print(list_slices())
        return 0
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in ("train", "sample"):
        print(f"{TOOL}: give one command, train or sample (or --list-slices); got {' '.join(commands) or 'none'}", file=sys.stderr)
        return 2
    try:
        return run(commands[0])
    except BadInput as e:
        print(f"{TOOL}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the --config file is missing or does not run
        print(f"{TOOL}: bad config: {config_problem(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main, flags_parser=absl_flags_parser(TOOL))
