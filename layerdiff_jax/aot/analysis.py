"""What one program compiled for a slice (TPU chips or GPUs) needs and does per chip.

- memory: XLA's buffer assignment, per chip: arguments, outputs, what outputs alias of donated arguments, temporaries;
  their total (arguments + outputs + temporaries - aliases) against what a program may use of the chip's memory
  (`slices.usable_memory`). A program XLA:TPU cannot fit fails to compile with RESOURCE_EXHAUSTED (against what it
  can use of the HBM, a little less than all), which `compile_program` turns into `DoesNotFit` naming the bytes over.
- FLOPs: the project's count on the jaxpr (`bench.measure.jaxpr_matmul_flops`: matrix products and convolutions of
  the whole program, every scan trip counted) beside XLA's cost analysis per chip, which counts every op but each loop
  body once (a DDIM loop's 50 steps, gradient accumulation's micro-batches are one body to it).
- HBM traffic: XLA's "bytes accessed" per chip (loop bodies once, too).
- collectives: parsed from the partitioned HLO (`hlo.collectives`).
- an ideal time, an estimate: the largest of compute (jaxpr FLOPs / chips at the bf16 peak), communication
  (collective bytes at the chip's full ICI or NVLink bandwidth) and HBM traffic (at its HBM bandwidth), as if each
  overlapped the others perfectly; the largest names the bound. Real steps are slower.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import time
from typing import Any

from layerdiff_jax.aot.compile_profile import op_names
from layerdiff_jax.aot.hlo import Collectives, collectives
from layerdiff_jax.aot.slices import GiB, Slice, compiler_options, usable_memory
from layerdiff_jax.bench.measure import jaxpr_matmul_flops
from layerdiff_jax.models.backend import tracing_for


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


class DoesNotFit(Exception):
    """A program that does not fit one chip's HBM; str() is one line naming the bytes over, `detail` what XLA said."""

    def __init__(self, what: str, over_bytes: float | None, context: str, detail: str = ""):
        self.over_bytes, self.detail = over_bytes, detail
        over = f": {gib(over_bytes)} over" if over_bytes is not None else ""
        super().__init__(f"{what} does not fit a chip's HBM{over} ({context})")


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def xla_memory_report(message: str) -> tuple[float | None, str]:
    """(bytes over HBM, a short account) from an XLA:TPU RESOURCE_EXHAUSTED message, whose sizes are 1024-based
    ("40.00G"); (None, its first line) when it has neither form XLA:TPU uses."""
    needed = re.search(rf"\({_SIZE}\) exceeds available \w+ \({_SIZE}\)", message) or re.search(
        rf"[Uu]sed {_SIZE} of {_SIZE}", message
    )
    if needed:
        need, available = _bytes(*needed.groups()[:2]), _bytes(*needed.groups()[2:])
        return need - available, f"XLA needs {gib(need)}, {gib(available)} available"
    exceeded = re.search(rf"[Ee]xceeded \w+ capacity by {_SIZE}", message)
    if exceeded:
        return _bytes(*exceeded.groups()), "XLA"
    return None, message.strip().splitlines()[0] if message.strip() else "RESOURCE_EXHAUSTED"


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per chip of one call, as XLA's buffer assignment plans it."""

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))


@dataclasses.dataclass(frozen=True)
class Estimate:
    compute_s: float | None
    communication_s: float
    hbm_s: float | None
    ideal_s: float
    bound: str  # "compute", "communication" or "HBM"


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    name: str
    memory: Memory
    jaxpr_flops: float | None  # the whole program (every chip), matrix products and convolutions
    xla_flops: float | None  # per chip, loop bodies once
    xla_bytes_accessed: float | None  # per chip, loop bodies once
    collectives: Collectives
    compile_s: float  # tracing, lowering and compiling
    op_names: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # HLO instruction -> JAX operation

    def estimate(self, s: Slice) -> Estimate:
        flops = self.jaxpr_flops / s.chips if self.jaxpr_flops is not None else self.xla_flops
        times = {
            "compute": flops / s.peak_bf16_flops if flops is not None else None,
            "communication": self.collectives.bytes_per_chip / s.ici_bytes_per_s,
            "HBM": self.xla_bytes_accessed / s.hbm_bytes_per_s if self.xla_bytes_accessed is not None else None,
        }
        bound = max((k for k, v in times.items() if v is not None), key=lambda k: times[k])
        return Estimate(times["compute"], times["communication"], times["HBM"], times[bound], bound)

    @property
    def notes(self) -> tuple[str, ...]:
        looped = [name for name, trips in self.collectives.loops if trips is None or trips > 1]
        loops = ("XLA's flops and bytes count each loop body once (loops: " + ", ".join(looped) + ")",) if looped else ()
        return loops + self.collectives.notes

    def to_json(self, s: Slice) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_bytes_per_chip": {**dataclasses.asdict(self.memory), "total": self.memory.total, "hbm": s.hbm_bytes, "usable": usable_memory(s)[0]},
            "jaxpr_flops": self.jaxpr_flops,
            "xla_flops_per_chip": self.xla_flops,
            "xla_bytes_accessed_per_chip": self.xla_bytes_accessed,
            "collectives": {
                k: {"count": v.count, "bytes_per_chip": v.bytes_per_chip, "seconds_at_ici": v.bytes_per_chip / s.ici_bytes_per_s}
                for k, v in self.collectives.kinds.items()
            },
            "loops": [{"op": name, "trips": trips} for name, trips in self.collectives.loops],
            "compile_s": self.compile_s,
            "estimate": dataclasses.asdict(self.estimate(s)),
            "notes": list(self.notes),
        }


def compile_program(name: str, trace, s: Slice) -> CompiledProgram:
    """Traces (`trace()` -> a `jax.stages.Traced`, models choosing the slice's kernels), lowers and compiles a program for
    slice `s`; `DoesNotFit` when XLA cannot fit it in a chip's HBM or its memory plan is over it."""
    start = time.perf_counter()
    with tracing_for(s.platform):
        traced = trace()
    try:
        compiled = traced.lower().compile(compiler_options(s))
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError; only RESOURCE_EXHAUSTED is ours to report
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(name, *xla_memory_report(str(e)), detail=str(e).strip()) from None
    compile_s = time.perf_counter() - start
    memory = Memory.of(compiled)
    usable, what = usable_memory(s)
    if memory.total > usable:
        raise DoesNotFit(name, memory.total - usable, f"XLA plans {gib(memory.total)} of {gib(usable)}, {what}")
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    hlo = compiled.as_text()
    return CompiledProgram(
        name, memory, jaxpr_matmul_flops(traced.jaxpr), cost.get("flops"), cost.get("bytes accessed"),
        collectives(hlo), compile_s, op_names(hlo),
    )


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
