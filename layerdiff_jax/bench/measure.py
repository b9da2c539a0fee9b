"""How the benchmark measures: warm wall-clock medians, compile time apart, memory, FLOPs, and the machine.

Every timed call blocks on its outputs (`jax.block_until_ready`, or a host copy for torch), so a time is the
whole call and not its dispatch. Compilation is excluded from the medians and reported on its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jax_core

log = logging.getLogger(__name__)

# bfloat16 dense peak FLOP/s per chip, by `device.device_kind` (vendor data sheets), for MFU.
BF16_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_VERSIONED_PACKAGES = (
    "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "flax", "optax", "torch", "diffusers",
    "transformers", "numpy",
)


@dataclasses.dataclass
class Timing:
    """Seconds per call: the median of `times` (warm calls), and the first call's compile time."""

    times: list[float]
    compile_s: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "times_s": self.times, "compile_s": self.compile_s}


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Runs `call` `warmup` times untimed, then `repeats` times timed; `call` must block on its result."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return Timing(times)


def time_interleaved(calls: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[Timing]:
    """Times several calls taking turns, the order reversed every other round (A B, B A, ...), so that a machine
    whose speed drifts between minutes (a shared VM) slows each side alike; one Timing per call."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(repeats):
        order = range(len(calls)) if round_ % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            start = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - start)
    return [Timing(t) for t in times]


def compile_jitted(jitted, *args) -> tuple[Any, float]:
    """(the compiled executable, seconds spent lowering and compiling it)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def timed(call: Callable[[], Any], repeats: int, *, warmup: int = 1, compile_s: float | None = None,
          torch_device=None) -> tuple[Timing, dict[str, Any]]:
    """`call` timed (`time_calls`; it must block on its result) with `compile_s` recorded, and a row's fields for
    it: host RSS around it, the allocator's peak and the load before and after (`load_fields`: a row measured on a
    busy machine is unreliable). A torch call (`torch_device`) reports torch's own peak on CUDA and gives torch's
    cached blocks back afterwards, so that JAX can allocate them again."""
    torch = None
    if torch_device is not None and torch_device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    load_before = load_average()[0]
    with RssPeak() as rss:
        timing = time_calls(call, repeats, warmup)
    timing.compile_s = compile_s
    fields = {**rss.as_dict(), **load_fields(load_before, load_average()[0])}
    peak = device_peak_bytes() if torch is None else torch.cuda.max_memory_allocated()
    if peak is not None:
        fields["device_peak_bytes"] = peak
    if torch is not None:
        torch.cuda.empty_cache()
    return timing, fields


def matmul_flops(fn: Callable, *args) -> float | None:
    """FLOPs of one call of `fn` in its matrix products and convolutions (2 per multiply-add), counted on its jaxpr
    so that every backend counts the same program. XLA's cost analysis does not: after optimisation the GPU
    backend calls cuBLAS and cuDNN as custom calls it does not count. Kernels called as custom calls from the
    program itself (cuDNN attention) are not counted either; None where `fn` has no such operation."""
    traced = (fn if hasattr(fn, "trace") else jax.jit(fn)).trace(*args)  # a jitted fn traced as its own program
    return jaxpr_matmul_flops(traced.jaxpr)


def jaxpr_matmul_flops(closed_jaxpr) -> float | None:
    """`matmul_flops` of a traced program's (closed) jaxpr, e.g. `jitted.trace(...).jaxpr`; scans count per trip."""
    return _jaxpr_flops(closed_jaxpr.jaxpr) or None


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            per_output = math.prod(rhs[d] for d in (spec[1], *spec[2:]))
            total += 2.0 * math.prod(out) * per_output
        trips = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax_core.jaxprs_in_params(eqn.params):
            total += _jaxpr_flops(sub) * trips
    return total


def compiled_memory_bytes(compiled) -> int | None:
    """Peak device memory of one call as XLA's buffer assignment plans it: arguments + outputs + temporaries
    (minus outputs aliased to donated arguments)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_peak_bytes() -> int | None:
    """The accelerator allocator's peak bytes in use so far in this process (None on CPU)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def peak_bf16_flops(device: jax.Device, override: float | None = None) -> float | None:
    """The chip's dense bfloat16 peak: `override` if given, else the table's entry (None for CPUs and chips
    not in the table, which then get no MFU)."""
    if override is not None:
        return override
    return BF16_PEAK_FLOPS.get(device.device_kind)


def device_available_bytes() -> int | None:
    """Bytes JAX can still allocate on the first device (None on CPU, or where the allocator keeps no limit).

    The allocator's limit less what is in use; where torch shares the GPU, also no more than the device's
    free memory plus what JAX holds unused, since torch's blocks are outside JAX's accounting."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    in_use = stats.get("bytes_in_use", 0)
    available = stats["bytes_limit"] - in_use
    torch = sys.modules.get("torch")  # torch holds GPU memory in this process only if something imported it
    if device.platform == "gpu" and torch is not None and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        held_unused = max(stats.get("pool_bytes", in_use) - in_use, 0)
        available = min(available, free + held_unused)
    return int(available)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


class RssPeak:
    """Context manager sampling this process's resident set size every `interval` seconds; `.peak` and
    `.baseline` (the RSS when entered) in bytes. Host memory is what a CPU "device" allocates from."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssPeak":
        self.baseline = self.peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())

    def as_dict(self) -> dict[str, int]:
        return {"rss_peak_bytes": self.peak, "rss_growth_bytes": self.peak - self.baseline}


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def cpu_cores() -> int:
    return os.cpu_count() or 1


def load_fields(before: float, after: float, cores: int | None = None) -> dict[str, Any]:
    """The 1-minute load average before and after a measurement. Above the core count, other work shared the
    cores while it ran: its time says little about this code, so the row is marked unreliable and none of its
    targets can count as met."""
    cores = cores or cpu_cores()
    fields: dict[str, Any] = {"load_before": before, "load_after": after, "cores": cores, "reliable": max(before, after) <= cores}
    if not fields["reliable"]:
        fields["unreliable"] = f"load average {max(before, after):.2f} > {cores} cores"
    return fields


def merged_fields(*fields: dict[str, Any]) -> dict[str, Any]:
    """Several measurements' fields as one row's, later ones winning, except that the row is unreliable if any
    of them was (with every reason): a later reliable measurement does not make an earlier busy one count."""
    merged = {k: v for f in fields for k, v in f.items() if k not in ("reliable", "unreliable")}
    reasons = [f["unreliable"] for f in fields if not f.get("reliable", True)]
    merged["reliable"] = not reasons
    if reasons:
        merged["unreliable"] = "; ".join(dict.fromkeys(reasons))
    return merged


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Date, machine and versions, as recorded with every result."""
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_backend": device.platform,
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # e.g. --xla_cpu_max_isa=AVX2 for XLA:CPU's own code
        "cpu_kernels_march": os.environ.get("LAYERDIFF_CPU_KERNELS_MARCH", "native"),  # models/cpu_kernels.py's target
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # huge-page malloc: layerdiff_jax/hostmem.py
        "versions": versions,
    }
