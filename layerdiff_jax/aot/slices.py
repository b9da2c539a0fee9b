"""The TPU slices programs can be compiled for on a machine without them, and their chips' figures.

  python scripts/compile_aot.py --list-slices

`slice_devices(name)` gives a slice's devices from libtpu's description of its topology
(`jax.experimental.topologies`): real TPU devices to build meshes and compile on, none of which can run anything.
libtpu is needed (`pip install -e ".[tpu]"`, which pins it to the installed jax); JAX's default backend stays the CPU.

Sources of the figures (per chip):
- HBM, bf16 peak, HBM bandwidth and bidirectional ICI bandwidth: the Cloud TPU system-architecture pages
  (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). v4: 32 GiB, 275 TFLOP/s, 1200 GB/s; v5e: 16 GiB, 197 TFLOP/s,
  819 GB/s, 400 GB/s ICI; v5p: 95 GiB, 459 TFLOP/s, 2765 GB/s, 1200 GB/s ICI; v6e: 32 GiB, 918 TFLOP/s, 1638 GB/s,
  800 GB/s ICI. The v4 page gives no per-chip ICI figure: 6 links x 2 directions x 45 GB/s from the JAX scaling book
  ("How to think about TPUs").
- Topology names, chip configs (megacore: a v4 / v5p chip's two TensorCores are one device) and 2x2x1 chips per host:
  MaxText's accelerator_to_spec_map.py (AI-Hypercomputer/maxtext), which uses 4-chip hosts for v5e and v6e too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import jax

GiB = 2**30


class SliceError(ValueError):
    """An unknown slice, or libtpu missing or unable to describe the slice; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # all links, both directions
    chip_config_name: str


CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1200e9, 6 * 2 * 45e9, "megacore"),
    "v5e": Chip(16 * GiB, 197e12, 819e9, 400e9, "default"),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, 1200e9, "megacore"),
    "v6e": Chip(32 * GiB, 918e12, 1638e9, 800e9, "default"),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # the Cloud TPU accelerator type, e.g. "v4-32" (v4 and v5p count TensorCores, v5e and v6e chips)
    topology_name: str  # libtpu's, e.g. "v4:2x2x4"
    chip_config_name: str
    chips_per_host_bounds: tuple[int, int, int]
    chips: int
    hosts: int
    hbm_bytes: int  # per chip, as for every figure below
    peak_bf16_flops: float
    ici_bytes_per_s: float
    hbm_bytes_per_s: float


def _slice(name: str, topology: str, chips_per_host: tuple[int, int, int] = (2, 2, 1)) -> Slice:
    chip = CHIPS[name.split("-")[0]]
    chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
    return Slice(
        name, topology, chip.chip_config_name, chips_per_host, chips, max(chips // math.prod(chips_per_host), 1),
        chip.hbm_bytes, chip.peak_bf16_flops, chip.ici_bytes_per_s, chip.hbm_bytes_per_s,
    )


SLICES = {
    s.name: s
    for s in (
        _slice("v4-8", "v4:2x2x1"),
        _slice("v4-16", "v4:2x2x2"),
        _slice("v4-32", "v4:2x2x4"),
        _slice("v4-128", "v4:4x4x4"),
        _slice("v5e-1", "v5e:1x1", (1, 1, 1)),
        _slice("v5e-8", "v5e:2x4"),
        _slice("v5e-256", "v5e:16x16"),
        _slice("v5p-8", "v5:2x2x1"),
        _slice("v5p-128", "v5:4x4x4"),
        _slice("v6e-8", "v6e:2x4"),
        _slice("v6e-256", "v6e:16x16"),
    )
}


def get_slice(name: str) -> Slice:
    if name not in SLICES:
        raise SliceError(f"unknown slice {name!r}; known slices: {', '.join(SLICES)}")
    return SLICES[name]


def check_libtpu() -> None:
    """SliceError (with the install command) unless libtpu is installed."""
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise SliceError(
            f'compiling for TPU slices needs libtpu, which is not installed: pip install -e ".[tpu]" '
            f'(or pip install "jax[tpu]=={jax.__version__}")'
        )


def slice_devices(name: str) -> list[jax.Device]:
    """The devices of slice `name` (one per chip), described by libtpu; they compile programs but run none."""
    return list(_topology(get_slice(name)))


@functools.cache
def _topology(s: Slice) -> tuple[jax.Device, ...]:
    check_libtpu()
    # libtpu reads these when it is first initialised: without them it queries the metadata server of a Cloud TPU
    # VM and warns. Every JAX process with libtpu installed locks /tmp/libtpu_lockfile, so another one on this
    # machine (a training run, the tests) would stop libtpu from loading here without ALLOW_MULTIPLE_LIBTPU_LOAD.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=s.topology_name, chip_config_name=s.chip_config_name,
            chips_per_host_bounds=s.chips_per_host_bounds, num_slices=1,
        )
    except Exception as e:  # noqa: BLE001 - libtpu's errors are of several types; the message says what happened
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SliceError(f"libtpu could not describe {s.name} ({s.topology_name}): {first}") from None
    if len(topology.devices) != s.chips:
        raise SliceError(f"libtpu describes {s.name} ({s.topology_name}) with {len(topology.devices)} devices, expected {s.chips}")
    return tuple(topology.devices)
