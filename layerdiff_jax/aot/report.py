"""What scripts/compile_aot.py prints (one table) and writes with --json: the compiled programs of one slice.

Times and throughputs are ideal estimates at the chips' peak rates (`analysis.Estimate`), not measurements.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from layerdiff_jax.aot.analysis import CompiledProgram, gib
from layerdiff_jax.aot.fit import Search
from layerdiff_jax.aot.hlo import KINDS
from layerdiff_jax.aot.slices import Slice, usable_memory


@dataclasses.dataclass(frozen=True)
class Report:
    command: str  # "train" or "sample"
    slice: Slice
    settings: dict[str, Any]  # what was compiled, as label: value
    batch_per_chip: int
    samples: int  # what one run of the programs trains on or makes: a step's samples, a batch's images
    unit: str  # "samples" (train) or "images" (sample)
    per: str  # "step" (train) or "batch" (sample)
    programs: tuple[CompiledProgram, ...]
    search: Search | None  # with --find-max-batch
    peak_rss_bytes: int

    @property
    def ideal_s(self) -> float:
        return sum(p.estimate(self.slice).ideal_s for p in self.programs)

    @property
    def flops_per_sample(self) -> float | None:
        flops = [p.jaxpr_flops for p in self.programs]
        return None if None in flops else sum(flops) / self.samples

    def to_json(self) -> dict[str, Any]:
        search = self.search
        return {
            "command": self.command,
            "slice": dataclasses.asdict(self.slice),
            "settings": self.settings,
            "batch_per_chip": self.batch_per_chip,
            "samples": self.samples,
            "programs": [p.to_json(self.slice) for p in self.programs],
            "estimate": {"ideal_s": self.ideal_s, f"{self.unit}_per_s": self.samples / self.ideal_s, f"flops_per_{self.unit[:-1]}": self.flops_per_sample},
            "max_batch_search": None if search is None else {
                "largest_batch_per_chip": search.batch, "tries": list(search.tries), "smallest_failing_batch": search.failed_batch,
                "failure": None if search.smallest_failure is None else str(search.smallest_failure),
                "failure_detail": None if search.smallest_failure is None else search.smallest_failure.detail,
            },
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def table(report: Report) -> str:
    s, programs = report.slice, report.programs
    estimates = [p.estimate(s) for p in programs]
    rows: list[tuple[str, ...]] = [("", *(p.name for p in programs))]

    def row(label: str, values) -> None:
        rows.append((label, *values))

    row("memory per chip: arguments", [gib(p.memory.argument) for p in programs])
    row("  outputs", [gib(p.memory.output) for p in programs])
    row("  aliased (donated)", [gib(p.memory.alias) for p in programs])
    row("  temporaries", [gib(p.memory.temp) for p in programs])
    usable, what = usable_memory(s)
    row(f"  total, of {gib(usable)} ({what})", [f"{gib(p.memory.total)} ({100 * p.memory.total / usable:.1f}%)" for p in programs])
    row("FLOPs, jaxpr, all chips", [_si(p.jaxpr_flops, "FLOP") for p in programs])
    row("FLOPs, XLA, per chip", [_si(p.xla_flops, "FLOP") for p in programs])
    row("HBM traffic, XLA, per chip", [_si(p.xla_bytes_accessed, "B") for p in programs])
    for kind in KINDS:
        row(f"{kind}: count, bytes per chip", [f"{p.collectives.kinds[kind].count}, {_si(p.collectives.kinds[kind].bytes_per_chip, 'B')}" for p in programs])
    row(f"collectives at {s.interconnect}", [_seconds(e.communication_s) for e in estimates])
    row("compute at bf16 peak", [_seconds(e.compute_s) for e in estimates])
    row("HBM traffic at HBM bandwidth", [_seconds(e.hbm_s) for e in estimates])
    row("ideal time (estimate), bound", [f"{_seconds(e.ideal_s)}, {e.bound}" for e in estimates])
    row("trace + lower + compile", [f"{p.compile_s:.1f} s" for p in programs])
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"{report.command} on {s.name}: {s.chips} chips, {s.hosts} host(s), {s.topology_name}; per chip {gib(s.hbm_bytes)} HBM, "
        f"{_si(s.peak_bf16_flops, 'FLOP/s')} bf16, {_si(s.hbm_bytes_per_s, 'B/s')} HBM, {_si(s.ici_bytes_per_s, 'B/s')} {s.interconnect}",
        *(f"  {label}: {value}" for label, value in report.settings.items()),
        f"  batch: {report.batch_per_chip} per chip, {report.samples} {report.unit} per {report.per}",
        "",
        *("  ".join(cell.ljust(w) for cell, w in zip(r, width)).rstrip() for r in rows),
        "",
        f"ideal throughput (estimate, at peak rates): {report.samples / report.ideal_s:.4g} {report.unit}/s for the slice, "
        f"{_si(report.flops_per_sample, 'FLOP')} per {report.unit[:-1]} (jaxpr)",
    ]
    search = report.search
    if search is not None:
        tried = ", ".join(str(b) for b in search.tries)
        limit = f"{search.failed_batch} does not: {search.smallest_failure}" if search.failed_batch else "the search limit was reached"
        lines.append(f"largest batch per chip that fits: {search.batch}; {limit} (compiled {tried})")
    for p in programs:
        lines += [f"note ({p.name}): {n}" for n in p.notes]
    lines.append(f"peak host memory of this process (RSS): {gib(report.peak_rss_bytes)}")
    return "\n".join(lines)
