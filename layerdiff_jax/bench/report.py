"""The benchmark's one table (Markdown, so it pastes into the README) and its JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("row", "benchmark", "impl", "median", "rate", "compile", "ratio", "target", "met", "XLA mem/step", "peak mem", "GFLOP/step", "MFU")


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


def _cells(row: dict[str, Any]) -> list[str]:
    ratio = f"{row['ratio']:.2f} ({row['ratio_name']})" if "ratio" in row else ""
    met = {True: "yes", False: "NO"}.get(row.get("met"), "")
    flops = f"{row['flops'] / 1e9:.1f}" if row.get("flops") else ""
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") else ""
    name = row["name"] + (f"; {row['note']}" if row.get("note") else "")
    return [
        row["row"], name, row["impl"], _seconds(row.get("median_s")), _rate(row), _seconds(row.get("compile_s")),
        ratio, row.get("target", ""), met, _bytes(row.get("xla_step_bytes")), _peak_memory(row), flops, mfu,
    ]


def format_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, headed by date, machine, versions and load."""
    env = result["environment"]
    v = env["versions"]
    load = result["load_average"]
    header = [
        f"date {env['date']}; {env['cpu']} x{env['cpu_count']} cores; backend {env['jax_backend']} ({env['device']})",
        f"jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, diffusers {v['diffusers']}, python {env['python']}; "
        f"torch threads {env.get('torch_threads')}; XLA_FLAGS={env['xla_flags'] or '(none)'}",
        f"attention_impl {result['settings']['attention_impl']}; median of {result['settings']['repeats']} warm calls; "
        f"load average (1 min) {load['start'][0]:.2f} at start, {load.get('end', load['start'])[0]:.2f} at end",
        "",
    ]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["rows"]]
    return "\n".join(header + lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
