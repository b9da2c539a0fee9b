"""The trainer's own train step compiled for a TPU slice or GPU node ahead of time, from abstract inputs only.

  python scripts/compile_aot.py train --config configs/tpu_v4.py --slice v4-32 --find-max-batch

The program is `training.program.build_train_program`'s, the one `trainer.train` runs: the same modules, optimizer,
state shardings, frozen shardings, micro loss, gradient accumulation and donation, on the config's mesh laid over the
slice's chips, fed by the slice's hosts with config.train.per_host_batch_size samples each per micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import ml_collections
from jax.sharding import Mesh

from layerdiff_jax.aot.analysis import CompiledProgram, compile_program
from layerdiff_jax.aot.slices import Slice, SliceError, slice_devices
from layerdiff_jax.data.tokenizer import MAX_LENGTH, build_toy_tokenizer
from layerdiff_jax.mesh import make_mesh, resolve_mesh_shape
from layerdiff_jax.models.backend import tracing_for
from layerdiff_jax.sharding import MESH_AXES
from layerdiff_jax.toy import toy_configs
from layerdiff_jax.training.config import TOY_SD
from layerdiff_jax.training.program import ModelConfigs, build_train_program


def model_configs(config: ml_collections.ConfigDict) -> tuple[ModelConfigs, str]:
    """The components' architectures and where they come from: config.model.sd_path's folder when it exists here, the
    toy SD for "toy", else SD 1.5's."""
    sd_path = config.model.sd_path
    if sd_path == TOY_SD:
        toy = toy_configs(build_toy_tokenizer().vocab_size)
        return ModelConfigs(toy["unet"], toy["vae"], toy["text_encoder"]), "the toy SD"
    if sd_path and Path(sd_path).is_dir():
        return ModelConfigs.from_folder(Path(sd_path)), str(sd_path)
    return ModelConfigs.sd15(), f"SD 1.5 (config.model.sd_path={sd_path!r} is not a folder here)"


def mesh_shape(config: ml_collections.ConfigDict, s: Slice) -> tuple[int, ...]:
    """config.mesh.shape with its -1 resolved for the slice's chips; SliceError when it cannot be laid over them."""
    try:
        return resolve_mesh_shape(config.mesh.shape, s.chips)
    except ValueError as e:
        raise SliceError(f"config.mesh.shape={tuple(config.mesh.shape)} does not divide the {s.chips} chips of {s.name}: {e}") from None


def batch_shards(shape: tuple[int, ...]) -> int:
    """The mesh devices a micro-batch is split over (data x fsdp): a chip's share of it is the batch per chip."""
    sizes = dict(zip(MESH_AXES, shape))
    return sizes["data"] * sizes["fsdp"]


def config_batch_per_chip(config: ml_collections.ConfigDict, s: Slice) -> int:
    """The config's per-host batch on the slice's hosts, per chip; SliceError when it does not split evenly."""
    shards = batch_shards(mesh_shape(config, s))
    samples = config.train.per_host_batch_size * s.hosts
    if samples % shards:
        raise SliceError(
            f"config.train.per_host_batch_size={config.train.per_host_batch_size} x {s.hosts} host(s) of {s.name} = {samples} "
            f"samples do not split over the mesh's {shards} data x fsdp chips; give --batch-per-chip"
        )
    return samples // shards


def with_batch_per_chip(config: ml_collections.ConfigDict, s: Slice, batch_per_chip: int) -> ml_collections.ConfigDict:
    """A copy of `config` whose per-host batch gives `batch_per_chip` samples per chip on the slice."""
    samples = batch_per_chip * batch_shards(mesh_shape(config, s))
    if samples % s.hosts:
        step = s.hosts // math.gcd(s.hosts, batch_shards(mesh_shape(config, s)))
        raise SliceError(f"{samples} samples per micro-batch do not split over the {s.hosts} hosts of {s.name}: use a multiple of {step} per chip")
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.per_host_batch_size = samples // s.hosts
    return config


@dataclasses.dataclass(frozen=True)
class TrainCompiler:
    """Compiles the train step of `config` on slice `s` for any batch per chip."""

    config: ml_collections.ConfigDict
    slice: Slice
    models: ModelConfigs
    mesh: Mesh

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, s: Slice, models: ModelConfigs) -> "TrainCompiler":
        return cls(config, s, models, make_mesh(mesh_shape(config, s), slice_devices(s.name)))

    def compile(self, batch_per_chip: int) -> CompiledProgram:
        """The step at `batch_per_chip`; DoesNotFit when it does not fit a chip."""
        config = with_batch_per_chip(self.config, self.slice, batch_per_chip)
        with tracing_for(self.slice.platform):  # the modules' init, traced for the state's shapes, picks the slice's kernels too
            program = build_train_program(config, self.mesh, self.models, token_length=MAX_LENGTH, processes=self.slice.hosts)
            args = program.abstract_inputs(self.slice.hosts, MAX_LENGTH)
        return compile_program("train step", lambda: program.step.trace(*args), self.slice)
