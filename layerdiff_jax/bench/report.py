"""The benchmark's one table (Markdown, so it pastes into docs/benchmarks.md) and its JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (
    "row", "benchmark", "impl", "median", "rate", "compile", "ratio", "error", "target", "met", "XLA mem/step",
    "peak mem", "GFLOP/step", "MFU", "load before/after",
)


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _bytes(value: int | None) -> str:
    if value is None:
        return ""
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _rate(row: dict[str, Any]) -> str:
    if "images_per_s" in row:
        return f"{row['images_per_s']:.3g} img/s"
    if "samples_per_s" in row:
        return f"{row['samples_per_s']:.3g} samples/s"
    return ""


def _peak_memory(row: dict[str, Any]) -> str:
    """Accelerators: the allocator peak; CPU: the host RSS peak during the timed calls (+ its growth)."""
    if "device_peak_bytes" in row:
        return _bytes(row["device_peak_bytes"])
    if "rss_peak_bytes" in row:
        return f"RSS {_bytes(row['rss_peak_bytes'])} (+{_bytes(max(row['rss_growth_bytes'], 0))})"
    return ""


def _error(row: dict[str, Any]) -> str:
    """Max abs and relative (L2) error against the row's reference."""
    if "max_abs_err" not in row:
        return ""
    text = f"{row['max_abs_err']:.1e} abs, {row['rel_err']:.1e} rel"
    if "grad_rel_err" in row:
        text += f"; grad {row['grad_rel_err']:.1e} rel"
    return text


def _met(row: dict[str, Any]) -> str:
    """yes / NO per target; a row measured on a busy machine is never 'met', whatever its numbers."""
    if row.get("status", "ok") != "ok":
        return row["status"]
    if not row.get("targets"):
        return ""
    if not row.get("reliable", True):
        return f"unreliable: {row['unreliable']}"
    return ", ".join({True: "yes", False: "NO", None: "n/a"}[t["met"]] for t in row["targets"])


def _load(row: dict[str, Any]) -> str:
    if "load_before" not in row:
        return ""
    return f"{row['load_before']:.2f} / {row['load_after']:.2f}"


def _cells(row: dict[str, Any]) -> list[str]:
    ratio = f"{row['ratio']:.2f} ({row['ratio_name']})" if "ratio" in row else ""
    flops = f"{row['flops'] / 1e9:.1f}" if row.get("flops") else ""
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") else ""
    name = row["name"] + (f"; {row['note']}" if row.get("note") else "") + (f"; {row['error']}" if row.get("error") else "")
    targets = ", ".join(f"{t['what']} {t['target']}" for t in row.get("targets", ()))
    return [
        row["row"], name, row.get("impl", ""), _seconds(row.get("median_s")), _rate(row), _seconds(row.get("compile_s")),
        ratio, _error(row), targets, _met(row), _bytes(row.get("xla_step_bytes")), _peak_memory(row), flops, mfu, _load(row),
    ]


def row_summary(row: dict[str, Any]) -> str:
    """One log line's worth of a row."""
    parts = [_seconds(row.get("median_s")), _rate(row), _error(row), _met(row), row.get("error", "")]
    return "; ".join(p for p in parts if p)


def _check_lines(result: dict[str, Any]) -> list[str]:
    steps = ", ".join(f"{s['id']} {s['status']}" for s in result["steps"])
    stopped = f"; stopped: {result['stopped']}" if result.get("stopped") else ""
    peak = result["environment"].get("peak_bf16_flops")
    return [
        f"check: deadline {result['deadline_s']:.0f} s, elapsed {result.get('elapsed_s', 0):.0f} s{stopped}; steps: {steps}",
        f"MFU against {peak / 1e12:.0f} TFLOP/s dense bfloat16" if peak else "MFU: no peak FLOP/s known for this device",
    ]


def format_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, headed by date, machine, versions and load."""
    env = result["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    load = result["load_average"]
    header = [
        f"date {env['date']}; host {env['host']}; {env['cpu']} x{env['cpu_count']} cores; backend {env['jax_backend']} "
        f"({env['device']} x{env['device_count']})",
        f"{versions}; python {env['python']}; torch threads {env.get('torch_threads')}, kernels "
        f"{env.get('torch_cpu_capability')}; our CPU kernels -march={env.get('cpu_kernels_march')}; "
        f"XLA_FLAGS={env['xla_flags'] or '(none)'}",
        f"attention_impl {result['settings'].get('attention_impl') or result['settings']['bench']['attention_impl']}; "
        f"medians of warm calls (row 1: ours and torch taking turns); load average (1 min) {load['start'][0]:.2f} at start, "
        f"{load.get('end', load['start'])[0]:.2f} at end; rows measured with the load above the core count are "
        "marked unreliable",
    ]
    if result.get("suite") == "check":
        header += _check_lines(result)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["rows"]]
    return "\n".join(header + [""] + lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
