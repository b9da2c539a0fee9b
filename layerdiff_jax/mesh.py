"""The device mesh, and where every array lives on it: one module for training and sampling.

Parameter placement comes from the logical axis names each parameter carries (`models/layers.py`) and
the one table in `layerdiff_jax.sharding`; a mesh axis that does not divide a dimension (4-channel convs
on an 8-way fsdp axis) is dropped for that dimension, which then stays whole. Batches are split over
data x fsdp on their sample axis.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layerdiff_jax.sharding import LOGICAL_AXIS_RULES, MESH_AXES

BATCH_AXES = tuple(dict(LOGICAL_AXIS_RULES)["batch"])  # ("data", "fsdp"): where samples are split
REPLICATED = PartitionSpec()  # params, schedules, timesteps: whole on every device


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with a -1 replaced by what fills `num_devices`; the product must equal it."""
    shape = tuple(int(n) for n in shape)
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if n == -1 else n for n in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, there are {num_devices}")
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(shape, len(devices))
    try:  # physical topology when the platform describes one (TPU slices, GPU nodes)
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh):
    """Makes the models' `with_logical_constraint` calls constrain activations on `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """Drops, per dimension, the trailing mesh axes that do not divide it."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        while axes and dim % math.prod(mesh_shape[a] for a in axes):
            axes = axes[:-1]
        fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*fitted)


def logical_shardings(boxed_tree: Any, mesh: Mesh | jax.sharding.AbstractMesh) -> Any:
    """NamedShardings for a tree whose leaves carry logical axis names (`nn.Partitioned` boxes of
    arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape(model.init, ...)`); unboxed leaves are replicated.
    The result has the structure of `nn.meta.unbox(boxed_tree)`."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), LOGICAL_AXIS_RULES)
    shapes = nn.meta.unbox(boxed_tree)
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit(spec, tuple(np.shape(leaf)), mesh_shape)),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def interleave_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """(N, ...) and (N, ...) -> (2N, ...) with rows a[0], b[0], a[1], b[1], ...: one batch for one model call in which
    row i's two versions are neighbours, so where the batch is split over devices they stay on row i's device
    (concatenating [a; b] along a split axis would move b's rows to other devices)."""
    return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def batch_spec(sample_axis: int = 0) -> PartitionSpec:
    """Axis `sample_axis` of a batch array (of any rank) split over data x fsdp, the other axes whole."""
    return PartitionSpec(*([None] * sample_axis), BATCH_AXES)


def batch_sharding(mesh: Mesh, sample_axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(sample_axis))


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """A mesh with every device on "data" (sampling: whole params on each device, batches split); None for
    a single device."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) == 1:
        return None
    return Mesh(np.asarray(devices).reshape(len(devices), 1, 1), MESH_AXES)


def gather_to_host(tree: Any) -> Any:
    """Global (possibly multi-process) arrays -> full numpy arrays on every process. Call on all processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def local_rows(x: jax.Array) -> dict[int, np.ndarray]:
    """The rows (leading-axis entries) of `x` that this process's devices hold, as numpy by row index, read without
    communication. Where the mesh holds a row on several devices only one copy counts (replica 0), so over all
    processes every row is returned exactly once."""
    rows = {}
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            rows.update(enumerate(np.asarray(shard.data), shard.index[0].start or 0))
    return rows


def allgather_ints(value: int) -> list[int]:
    """`value` from every process, in process order, once all have called it (so also a barrier). Call on all
    processes."""
    if jax.process_count() == 1:
        return [value]
    return [int(v) for v in multihost_utils.process_allgather(np.int32(value))]


def batch_size_divisor(mesh: Mesh) -> int:
    """A global micro-batch must be a multiple of this: the devices it is split over."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, sample_axis: int = 0) -> dict[str, jax.Array]:
    """Per-host numpy arrays -> global arrays whose `sample_axis` concatenates every host's samples."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, sample_axis)
        shape = list(value.shape)
        shape[sample_axis] *= jax.process_count()
        out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
    return out


def put_global(tree: Any, shardings: Any) -> Any:
    """Host numpy values, equal on every process, -> global arrays placed with `shardings`."""

    def put(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Starts `jax.distributed` when this run has several processes; returns whether it did.

    Explicit values (flags) win, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; with none
    of those, a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts) or a SLURM job of
    several tasks is detected and JAX finds the values itself. Otherwise the run is single-process.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes is not None:
        if num_processes == 1:
            return False
        missing = [n for n, v in (("coordinator_address", coordinator_address), ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"{num_processes} processes need {' and '.join(missing)} (flags or JAX_* environment variables)")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1 or int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(coordinator_address)
        return True
    return False
