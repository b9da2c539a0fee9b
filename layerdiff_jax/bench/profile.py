"""Where a UNet's forward+backward spends its time on CPU, ours and torch's, by kind of work.

  python scripts/bench.py --suite profile     # the toy UNet at the pretraining batch and the mid-size UNet

Ours: the profiler's trace of the compiled program names every thunk (one fused kernel) it ran; the optimized
HLO says what each one computes. A convolution is a forward, an input gradient (a convolution of the
transposed program) or a weight gradient (XLA writes it as a convolution whose window spans the image); a
fusion holding a dot, or the fused attention kernel, is a matmul (attention, linear layers); then reductions
(norm statistics, bias gradients), transposes and copies, and the remaining elementwise work. torch's operators (torch.profiler,
self time) are grouped into the same kinds; its convolution backward computes both gradients in one operator.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from typing import Any, Callable

import jax

from layerdiff_jax.bench import measure
from layerdiff_jax.models.unet import UNetConfig

KINDS = (
    "conv forward", "conv input grad", "conv weight grad", "conv backward (both)", "matmul", "reductions and norms",
    "transposes and copies", "elementwise and other",
)
_NOT_THUNKS = ("ThunkExecutor", "$", "Pjit", "Slinky")  # host-side and scheduling events around the thunks


def _thunk_texts(hlo: str) -> dict[str, str]:
    """Instruction name -> what it computes: the body of the computation it calls (a fusion), else its own line."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?(\S+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M)}
    texts = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo, re.M):
        called = re.search(r"calls=%?([\w.\-]+)", m.group(2))
        texts[m.group(1)] = bodies.get(called.group(1), "") if called else m.group(2)
    return texts


def xla_kind(text: str) -> str:
    """The kind of work an XLA:CPU thunk does, from the text of what it computes (`_thunk_texts`)."""
    conv = re.search(r"convolution\(.*?window=\{size=(\d+)x(\d+)", text)
    if conv:
        if int(conv.group(1)) > 3 or int(conv.group(2)) > 3:  # the models' kernels are at most 3x3
            return "conv weight grad"
        return "conv input grad" if "transpose(jvp(" in text else "conv forward"
    if re.search(r"\bdot\(", text) or "layerdiff_cpu_attention" in text:  # the fused CPU attention kernel too
        return "matmul"
    if "reduce(" in text or "layerdiff_cpu_group_norm" in text:  # the fused CPU GroupNorm too
        return "reductions and norms"
    if re.search(r"(ROOT \S+ = |^)\S+ (transpose|copy)\(", text, re.M):
        return "transposes and copies"
    return "elementwise and other"


def torch_kind(op: str) -> str:
    op = op.lower()
    if "conv" in op and "backward" in op:
        return "conv backward (both)"
    if "conv" in op:
        return "conv forward"
    if any(s in op for s in ("mm", "matmul", "linear", "attention")):
        return "matmul"
    if "norm" in op or "sum" in op or "mean" in op:
        return "reductions and norms"
    if any(s in op for s in ("copy", "contiguous", "clone", "permute", "transpose", "cat")):
        return "transposes and copies"
    return "elementwise and other"


def trace_events(trace_dir: str) -> list[dict[str, Any]]:
    """The complete events (name, start and duration in microseconds) of the newest profiler trace under `trace_dir`."""
    traces = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not traces:
        raise FileNotFoundError(f"no profiler trace under {trace_dir}")
    with gzip.open(traces[-1]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def xla_breakdown(program: Callable, args: tuple, calls: int = 3) -> dict[str, float]:
    """Milliseconds per call of the jitted `program` on `args`, by kind (KINDS), from the profiler's trace."""
    compiled = program.lower(*args).compile()
    texts = _thunk_texts(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(compiled(*args))
        events = trace_events(trace_dir)
    totals: collections.Counter = collections.Counter()
    for event in events:
        if not event["name"].startswith(_NOT_THUNKS):
            totals[xla_kind(texts.get(event["name"], ""))] += event["dur"] / 1e3 / calls
    return dict(totals)


def torch_breakdown(call: Callable[[], Any], calls: int = 3) -> dict[str, float]:
    """Milliseconds per call of `call` by kind, from torch.profiler's operator self times."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    totals: collections.Counter = collections.Counter()
    for op in prof.key_averages():
        totals[torch_kind(op.key)] += op.self_cpu_time_total / 1e3 / calls
    return dict(totals)


@dataclasses.dataclass(frozen=True)
class ProfiledUNet:
    name: str
    config: UNetConfig
    batch: int
    latent_size: int


def profiled_unets(quick: bool) -> list[ProfiledUNet]:
    """The toy UNet at the toy base's pretraining batch (what the demo's CPU time goes to) and the standard
    suite's mid-size UNet; --quick: the quick suite's UNet only."""
    from layerdiff_jax.bench.suite import BenchSettings
    from layerdiff_jax.data.tokenizer import build_toy_tokenizer
    from layerdiff_jax.toy import toy_configs

    if quick:
        unet = BenchSettings.for_device("cpu", quick=True).unet
        return [ProfiledUNet("quick UNet", unet.config, unet.batch, unet.latent_size)]
    mid = BenchSettings.for_device("cpu").unet
    toy = toy_configs(build_toy_tokenizer().vocab_size)["unet"]
    return [ProfiledUNet("toy UNet", toy, 32, 16), ProfiledUNet("mid-size UNet", mid.config, mid.batch, mid.latent_size)]


def profile_unet(unet: ProfiledUNet) -> dict[str, Any]:
    """Both sides' breakdown of one UNet's forward+backward (the same config and weights, float32)."""
    import torch

    from layerdiff_jax.bench import torch_reference as ref
    from layerdiff_jax.bench.suite import build_unet_pair, torch_unet_backward_call, unet_loss_grad

    ref.set_cpu_threads()
    pair = build_unet_pair(unet.config, unet.batch, unet.latent_size, 77)
    cpu = torch.device("cpu")
    before = measure.load_average()[0]
    ours = xla_breakdown(jax.jit(unet_loss_grad(unet.config, "float32", "cpu")), pair.ours_args("float32"))
    theirs = torch_breakdown(torch_unet_backward_call(pair.torch_unet, pair.torch_args(cpu, "float32"), cpu))
    return {
        "unet": unet.name, "batch": unet.batch, "latent_size": unet.latent_size, "ours_ms": ours, "torch_ms": theirs,
        **measure.load_fields(before, measure.load_average()[0]),
    }


def _cells(ms: float | None, total: float) -> str:
    return " | " if ms is None else f"{ms:.1f} | {100 * ms / total:.0f}"


def format_breakdown(result: dict[str, Any]) -> str:
    """One Markdown table per UNet: ms per forward+backward and share of the total, ours beside torch's."""
    lines = []
    for r in result["profiles"]:
        ours, theirs = r["ours_ms"], r["torch_ms"]
        ours_total, theirs_total = sum(ours.values()), sum(theirs.values())
        reliability = "" if r["reliable"] else f" — UNRELIABLE: {r['unreliable']}"
        lines += [
            f"\n{r['unet']} forward+backward, B={r['batch']}, {r['latent_size']}x{r['latent_size']} latents, float32 "
            f"(load {r['load_before']:.2f} / {r['load_after']:.2f} on {r['cores']} cores{reliability})\n",
            "| kind | ours ms | ours % | torch ms | torch % |", "|---|---:|---:|---:|---:|",
        ]
        for kind in KINDS:
            if kind in ours or kind in theirs:
                lines.append(f"| {kind} | {_cells(ours.get(kind), ours_total)} | {_cells(theirs.get(kind), theirs_total)} |")
        lines.append(f"| **total** | {ours_total:.1f} | 100 | {theirs_total:.1f} | 100 |")
    return "\n".join(lines)


def run_profile(quick: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    result: dict[str, Any] = {"suite": "profile", "environment": measure.environment(), "profiles": []}
    for unet in profiled_unets(quick):
        progress(f"profiling the {unet.name}: ours, then torch")
        result["profiles"].append(profile_unet(unet))
    return result
