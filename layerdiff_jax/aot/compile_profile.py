"""Where an XLA:TPU compile spends its time, read from the JAX profiler's trace of it.

  python scripts/compile_aot.py train --config configs/tpu_v4.py --slice v4-32 --profile-compile /tmp/compile_trace

libtpu marks its compile with trace events: the HLO passes, buffer assignment, then the lowering, which emits the
program one HLO instruction at a time ("XLA::TPU emitting for fusion.13676"), and code generation. `traced(dir)`
records them (the Python tracer off, so the trace holds the compiler's events, not every Python call); `summary`
reads the trace back: the time of each phase and the instructions that took longest to emit, each with the JAX
operation it came from (the `op_name` of its HLO metadata). The trace itself opens in Perfetto or TensorBoard.
Tracing slows the compile markedly at SD-1.5 size: read the phases as shares, and time a compile untraced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax

from layerdiff_jax.bench.profile import trace_events

PHASES = {  # libtpu's event -> what the summary calls it, in compile order
    "XLA::TPU run hlo passes": "HLO passes",
    "XLA::TPU memory space and buffer assignment": "buffer assignment",
    "XLA::TPU lowering and optimization": "lowering (emitting instructions)",
    "XLA::TPU code generator": "code generation",
}
_EMITTING = "XLA::TPU emitting for "
_OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\bop_name=\"([^\"]*)\"", re.M)


@contextlib.contextmanager
def traced(trace_dir: str | Path) -> Iterator[None]:
    """Records the compiles inside into a profiler trace under `trace_dir`. Start it once the slice's devices exist
    (`TrainCompiler.create`, `SampleCompiler.create`): libtpu's events are recorded only when it was set up first."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # the compiler's events only: tracing Python would flood the trace
    options.host_tracer_level = 3
    jax.profiler.start_trace(str(trace_dir), profiler_options=options)
    try:
        yield
    finally:
        jax.profiler.stop_trace()


def op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: the JAX operation it came from} for the instructions whose metadata names one."""
    return dict(_OP_NAME.findall(hlo_text))


@dataclasses.dataclass(frozen=True)
class CompileSummary:
    phases_s: dict[str, float]  # PHASES' names -> seconds, summed over the compiles traced
    instructions_emitted: int
    slowest: tuple[tuple[str, float, str], ...]  # (instruction, seconds to emit, JAX operation or "")

    def lines(self) -> list[str]:
        phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.phases_s.items())
        out = [f"compile phases: {phases}; {self.instructions_emitted} instructions emitted"]
        out += [f"  {seconds:7.1f} s  {name}  {source[-110:]}" for name, seconds, source in self.slowest]
        return out


def summary(trace_dir: str | Path, sources: Mapping[str, str], count: int = 8) -> CompileSummary:
    """The newest trace under `trace_dir`, summarised; `sources` maps instruction names to JAX operations (`op_names`)."""
    events = trace_events(str(trace_dir))
    phases = dict.fromkeys(PHASES.values(), 0.0)
    emitted = []
    for e in events:
        if e["name"] in PHASES:
            phases[PHASES[e["name"]]] += e["dur"] / 1e6
        elif e["name"].startswith(_EMITTING):
            emitted.append((e["name"][len(_EMITTING) :], e["dur"] / 1e6))
    emitted.sort(key=lambda item: -item[1])
    slowest = tuple((name, seconds, sources.get(name, "")) for name, seconds in emitted[:count])
    return CompileSummary(phases, len(emitted), slowest)
