"""How the benchmark measures: warm wall-clock medians, compile time apart, memory, FLOPs, and the machine.

Every timed call blocks on its outputs (`jax.block_until_ready`, or a host copy for torch), so a time is the
whole call and not its dispatch. Compilation is excluded from the medians and reported on its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable

import jax

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
_VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "numpy")


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


def compile_jitted(jitted, *args) -> tuple[Any, float]:
    """(the compiled executable, seconds spent lowering and compiling it)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_compiled(compiled, args: tuple, repeats: int, compile_s: float) -> Timing:
    timing = time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats)
    timing.compile_s = compile_s
    return timing


def cost_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable from XLA's cost analysis (None where the backend has none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends don't implement it; the FLOPs column then says n/a
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


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


def peak_bf16_flops(device: jax.Device) -> float | None:
    return BF16_PEAK_FLOPS.get(device.device_kind)


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
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions,
    }
