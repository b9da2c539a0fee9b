"""The TPU slices and NVIDIA GPU nodes programs can be compiled for on a machine without them, and their chips' figures.

  python scripts/compile_aot.py --list-slices

`slice_devices(name)` gives a slice's devices from XLA's description of its topology (`jax.experimental.topologies`):
real TPU or GPU devices to build meshes and compile on, none of which can run anything. JAX's default backend stays
the CPU. TPU slices need libtpu (`pip install -e ".[tpu]"`, which pins it to the installed jax). GPU nodes need jax's
CUDA plugin without the CUDA libraries (`pip install -e ".[gpu-aot]"`, ~480 MB), told the GPU's figures by a target
config (`CudaDevice.target_config`), as XLA compiles for a GPU it cannot see; in that environment every JAX process
must run with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (set here for the compile), or the plugin prints an error at start-up
for the CUDA libraries it does not have: keep it in its own virtual environment.

Sources of the figures (per chip):
- HBM, bf16 peak, HBM bandwidth and bidirectional ICI bandwidth: the Cloud TPU system-architecture pages
  (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). v4: 32 GiB, 275 TFLOP/s, 1200 GB/s; v5e: 16 GiB, 197 TFLOP/s,
  819 GB/s, 400 GB/s ICI; v5p: 95 GiB, 459 TFLOP/s, 2765 GB/s, 1200 GB/s ICI; v6e: 32 GiB, 918 TFLOP/s, 1638 GB/s,
  800 GB/s ICI. The v4 page gives no per-chip ICI figure: 6 links x 2 directions x 45 GB/s from the JAX scaling book
  ("How to think about TPUs").
- Topology names, chip configs (megacore: a v4 / v5p chip's two TensorCores are one device) and 2x2x1 chips per host:
  MaxText's accelerator_to_spec_map.py (AI-Hypercomputer/maxtext), which uses 4-chip hosts for v5e and v6e too.
- GPUs (SXM, the 8-GPU HGX boards): NVIDIA's H100 and H200 datasheets: 132 SMs, 50 MB L2, 989 TFLOP/s dense bf16,
  900 GB/s NVLink (both directions); H100 80 GB HBM3 at 3.35 TB/s, of which CUDA reports 84,929,347,584 bytes (XLA's
  own H100 SXM spec, xla/tools/hlo_opt/gpu_specs); H200 141 GB HBM3e at 4.8 TB/s. The per-SM limits are compute
  capability 9.0's (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
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
    """An unknown slice, or its compiler (libtpu, the CUDA plugin) missing or unable to describe it; one line."""


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # all links, both directions
    chip_config_name: str


@dataclasses.dataclass(frozen=True)
class CudaDevice:
    """An NVIDIA GPU as XLA's GPU compiler needs to know it to compile for it without one."""

    description: str  # the device name CUDA reports
    memory_bytes: int
    memory_bytes_per_s: float
    sms: int
    l2_bytes: int
    clock_ghz: float
    compute_capability: tuple[int, int]

    def target_config(self) -> str:
        """XLA's GpuTargetConfigProto, as text: the device, and the cuDNN and CUDA runtime versions to compile for
        (cuDNN 9.8, the oldest jax's CUDA 12 plugin accepts; CUDA 12.8)."""
        major, minor = self.compute_capability
        limits = " ".join(f"{k}: {v}" for k, v in _SM90_LIMITS.items())
        return (
            f"gpu_device_info {{ {limits} core_count: {self.sms} memory_bandwidth: {int(self.memory_bytes_per_s)} "
            f"l2_cache_size: {self.l2_bytes} clock_rate_ghz: {self.clock_ghz} device_memory_size: {self.memory_bytes} "
            f"cuda_compute_capability {{ major: {major} minor: {minor} }} }}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 }}\n'
            f'runtime_version {{ major: 12 minor: 8 }}\ndevice_description_str: "{self.description}"\n'
        )


_SM90_LIMITS = {  # compute capability 9.0, per block and per SM ("core")
    "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
    "shared_memory_per_block_optin": 227 * 1024, "shared_memory_per_core": 228 * 1024, "threads_per_core_limit": 2048,
    "fpus_per_core": 128, "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
}

CUDA_DEVICES = {
    "h100": CudaDevice("NVIDIA H100 80GB HBM3", 84_929_347_584, 3.35e12, 132, 50 * 2**20, 1.98, (9, 0)),
    "h200": CudaDevice("NVIDIA H200", 141_000_000_000, 4.8e12, 132, 50 * 2**20, 1.98, (9, 0)),
}

CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1200e9, 6 * 2 * 45e9, "megacore"),
    "v5e": Chip(16 * GiB, 197e12, 819e9, 400e9, "default"),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, 1200e9, "megacore"),
    "v6e": Chip(32 * GiB, 918e12, 1638e9, 800e9, "default"),
    **{kind: Chip(gpu.memory_bytes, 989e12, gpu.memory_bytes_per_s, 900e9, "") for kind, gpu in CUDA_DEVICES.items()},
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # the Cloud TPU accelerator type, e.g. "v4-32" (v4 and v5p count TensorCores, v5e and v6e chips); h100-8
    platform: str  # "tpu" or "gpu"
    topology_name: str  # libtpu's, e.g. "v4:2x2x4"; the CUDA plugin's partitions x hosts x GPUs per host, "1x1x8"
    chip_config_name: str
    chips_per_host_bounds: tuple[int, int, int]
    chips: int
    hosts: int
    hbm_bytes: int  # per chip, as for every figure below
    peak_bf16_flops: float
    ici_bytes_per_s: float  # the chips' interconnect: ICI on TPUs, NVLink on GPUs
    hbm_bytes_per_s: float

    @property
    def interconnect(self) -> str:
        return "NVLink" if self.platform == "gpu" else "ICI"


def _slice(name: str, topology: str, chips_per_host: tuple[int, int, int] = (2, 2, 1)) -> Slice:
    chip = CHIPS[name.split("-")[0]]
    chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
    return Slice(
        name, "tpu", topology, chip.chip_config_name, chips_per_host, chips, max(chips // math.prod(chips_per_host), 1),
        chip.hbm_bytes, chip.peak_bf16_flops, chip.ici_bytes_per_s, chip.hbm_bytes_per_s,
    )


def _gpu_node(name: str) -> Slice:
    """One host of `gpus` NVIDIA GPUs, e.g. "h100-8"."""
    kind, gpus = name.split("-")
    chip = CHIPS[kind]
    return Slice(
        name, "gpu", f"1x1x{gpus}", "", (1, 1, int(gpus)), int(gpus), 1,
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
        _gpu_node("h100-1"),
        _gpu_node("h100-8"),
        _gpu_node("h200-1"),
        _gpu_node("h200-8"),
    )
}


def get_slice(name: str) -> Slice:
    if name not in SLICES:
        raise SliceError(f"unknown slice {name!r}; known slices: {', '.join(SLICES)}")
    return SLICES[name]


def check_compiler(s: Slice) -> None:
    """SliceError (with the install command) unless the compiler for slice `s`'s platform is installed."""
    if s.platform == "gpu":
        if not all(_installed(m) for m in ("jax_cuda12_plugin", "jax_plugins.xla_cuda12")):
            raise SliceError(
                f'compiling for NVIDIA GPUs needs jax\'s CUDA plugin, which is not installed: pip install -e ".[gpu-aot]" '
                f'(or pip install "jax[cuda12-local]=={jax.__version__}"), best in a virtual environment of its own'
            )
    elif importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise SliceError(
            f'compiling for TPU slices needs libtpu, which is not installed: pip install -e ".[tpu]" '
            f'(or pip install "jax[tpu]=={jax.__version__}")'
        )


def usable_memory(s: Slice) -> tuple[int, str]:
    """(bytes, what they are) a program may take of one chip of `s`: a TPU chip's HBM; of a GPU's memory the share
    JAX's allocator takes on it, XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's default 0.75), read as the GPU run would."""
    if s.platform != "gpu":
        return s.hbm_bytes, "HBM"
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    try:
        share = float(fraction)
    except ValueError:
        raise SliceError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction!r} is not a number") from None
    if not 0 < share <= 1:
        raise SliceError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction} is not in (0, 1]")
    return int(share * s.hbm_bytes), f"HBM x {share:g}, XLA_PYTHON_CLIENT_MEM_FRACTION"


def compiler_options(s: Slice) -> dict[str, bool]:
    """The XLA options programs for slice `s` are compiled with here."""
    if s.platform == "gpu":
        # Without the GPU, XLA cannot autotune Triton's GEMM tilings, and for some of SD's matrix products it finds
        # none ("Couldn't find output tile sizes"); with cuBLAS's GEMMs the program compiles.
        return {"xla_gpu_enable_triton_gemm": False}
    return {}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def slice_devices(name: str) -> list[jax.Device]:
    """The devices of slice `name` (one per chip), described by libtpu or the CUDA plugin; they compile programs but
    run none."""
    return list(_topology(get_slice(name)))


@functools.cache
def _topology(s: Slice) -> tuple[jax.Device, ...]:
    check_compiler(s)
    from jax.experimental import topologies

    if s.platform == "gpu":
        # Read when JAX first starts its backends: the plugin then loads without the CUDA libraries it would check.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        describe = functools.partial(
            topologies.get_topology_desc, platform="cuda", topology=s.topology_name,
            target_config=CUDA_DEVICES[s.name.split("-")[0]].target_config(),
        )
        hint = "; if JAX had started before, run with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1"
    else:
        # libtpu reads these when it is first initialised: without them it queries the metadata server of a Cloud TPU
        # VM and warns. Every JAX process with libtpu installed locks /tmp/libtpu_lockfile, so another one on this
        # machine (a training run, the tests) would stop libtpu from loading here without ALLOW_MULTIPLE_LIBTPU_LOAD.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        describe = functools.partial(
            topologies.get_topology_desc, platform="tpu", topology_name=s.topology_name,
            chip_config_name=s.chip_config_name, chips_per_host_bounds=s.chips_per_host_bounds, num_slices=1,
        )
        hint = ""
    try:
        topology = describe()
    except Exception as e:  # noqa: BLE001 - the plugins' errors are of several types; the message says what happened
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SliceError(f"could not describe {s.name} ({s.topology_name}): {first}{hint}") from None
    if len(topology.devices) != s.chips:
        raise SliceError(f"{s.name} ({s.topology_name}) is described with {len(topology.devices)} devices, expected {s.chips}")
    return tuple(topology.devices)
