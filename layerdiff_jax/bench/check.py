"""The accelerator check: `scripts/bench.py --device gpu --suite check --out DIR`.

One command that spends a short accelerator slot on measuring, not on setting up. It runs in a time box
(`deadline_s`, 8 minutes by default, compilation included) and measures in order of value, so that a run cut
short still reports the first rows:

  a1  correctness: the SD-1.5 UNet forward, ours in float32 and bfloat16 against diffusers' torch UNet with the
      same weights on the same device (max abs and relative error against torch float32);
  a2  attention: XLA against the device kernel (cuDNN on GPUs) at SD-1.5's head dims (40, 80, 160), the VAE's one
      512-wide head and LayerDiff's masked layer attention; where the kernel refuses, the reason and the
      fallback that ran;
  b   the UNet forward, 64x64 latents, 8 images doubled for classifier-free guidance, bfloat16: ours with XLA
      and with the kernel against torch eager (SDPA attention): images/s, MFU, compile time;
  c   50-step DDIM + CFG text-to-image at 512x512, 8 images: ours (one jitted program) against diffusers'
      StableDiffusionPipeline with the same random weights: images/s;
  d   the LayerDiff SD-1.5 train step, 256x256, 4 layers, bfloat16: the largest batch that fits, remat off and
      on: samples/s, MFU, memory;
  b'  the UNet forward under `torch.compile`, last because its compile time has no bound here.

Between steps the deadline is checked; a watchdog stops the process at the deadline itself. Every finished
row is written at once to DIR/check.json and DIR/check.md, so a killed run keeps what it measured. On CPU
(`--quick`) the same steps run at toy sizes: that is the test suite's guard against the check rotting
between accelerator slots (its times mean nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.bench import measure, report
from layerdiff_jax.bench.suite import (
    BenchSettings,
    LayerBench,
    Row,
    SDBench,
    UNetBench,
    UNetPair,
    _compare,
    _row,
    add_target,
    bench_ddim,
    build_sd,
    build_unet_pair,
    compile_layer_step,
    error_fields,
    failed_row,
    flops_fields,
    layer_training,
    nhwc_numpy,
    quick_compilation,
    quick_sd,
    suite_environment,
    time_layer_step,
    torch_unet_call,
    unet_forward,
)
from layerdiff_jax.data.tokenizer import build_toy_tokenizer
from layerdiff_jax.models import attention
from layerdiff_jax.models.clip_text import CLIPTextConfig
from layerdiff_jax.models.unet import UNetConfig
from layerdiff_jax.models.vae import VAEConfig

log = logging.getLogger(__name__)

DEADLINE_S = 8 * 60
EXIT_STEP_FAILED, EXIT_DEADLINE = 1, 3
# The targets.
COMPILE_TARGET_S = 180.0
UNET_SPEEDUP_TARGET = 1.2  # ours vs torch eager with SDPA
UNET_MFU_TARGET = 0.5
TRAIN_MFU_TARGET = 0.4
# bfloat16 keeps 8 significant bits: ours may be as far from float32 as torch's own bfloat16 run, with slack.
BF16_ERROR_SLACK = 2.0
FLOAT32_REL_TARGET = 1e-4  # both sides at full float32 precision (no TF32)
ATTENTION_BF16_REL_TARGET = 1e-2
FIT_MARGIN = 0.9  # use at most this share of the free device memory: the allocator fragments
CFG_COPIES = 2  # classifier-free guidance runs the UNet on the prompt and on the empty prompt


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    name: str
    batch: int
    heads: int
    head_dim: int
    q_len: int
    kv_len: int
    key_mask: bool = False  # the last quarter of the keys masked out (padded layers / prompts)


def _attention_cases(quick: bool) -> tuple[AttentionCase, ...]:
    """SD-1.5's attention at 64x64 latents (heads of 40, 80, 160 at 4096, 1024, 256 tokens; 77 text tokens), the
    VAE's mid-block at 512x512 (one 512-wide head over 4096 tokens) and LayerDiff's masked attention at 256x256
    training (inter-layer: 4 layer tokens at each of 32x32 positions; prompt enhancer: 4 x 77 prompt tokens)."""
    if quick:  # one case of each kind (a UNet head dim, the VAE's, a masked one) over short sequences
        return (
            AttentionCase("UNet 16x16 text", 2, 8, 160, 32, 77),
            AttentionCase("VAE mid-block", 1, 1, 512, 32, 32),
            AttentionCase("LayerDiff inter-layer", 16, 8, 40, 4, 4, key_mask=True),
        )
    return (
        AttentionCase("UNet 64x64 self", 2, 8, 40, 4096, 4096),
        AttentionCase("UNet 64x64 text", 2, 8, 40, 4096, 77),
        AttentionCase("UNet 32x32 self", 2, 8, 80, 1024, 1024),
        AttentionCase("UNet 32x32 text", 2, 8, 80, 1024, 77),
        AttentionCase("UNet 16x16 self", 2, 8, 160, 256, 256),
        AttentionCase("UNet 16x16 text", 2, 8, 160, 256, 77),
        AttentionCase("VAE mid-block", 1, 1, 512, 4096, 4096),
        AttentionCase("LayerDiff inter-layer", 2048, 8, 40, 4, 4, key_mask=True),
        AttentionCase("LayerDiff prompt enhancer", 2, 8, 96, 4 * 77, 4 * 77, key_mask=True),
    )


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """The check's sizes. `bench` holds what the standard suite's row functions take (its `unet.batch` is the
    CFG-doubled batch, its `attention_impl` the device kernel under test, its `layers.batch` the train batch
    to start the search from)."""

    bench: BenchSettings
    images: int  # images per guided UNet call
    attention_cases: tuple[AttentionCase, ...]
    remat_modes: tuple[bool, ...]
    train_batch: int | None  # fixed train batch; None: the largest that fits
    repeats: dict[str, int]
    deadline_s: float
    torch_compile_backend: str
    steps: tuple[str, ...]  # the step ids to run, in the check's order (a rerun of those a deadline cut)

    @classmethod
    def for_device(
        cls, device: str, *, quick: bool = False, deadline_s: float = DEADLINE_S, peak_flops: float | None = None,
        train_batch: int | None = None, attention_impl: str | None = None, steps: tuple[str, ...] | None = None,
    ) -> "CheckSettings":
        """GPU: SD-1.5 sizes in bfloat16; quick (the CPU path): toy sizes, every step, one or two repeats."""
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "cpu" and not quick:
            raise ValueError("the check at SD-1.5 size is for accelerators (hours on a CPU); on a CPU pass --quick")
        if train_batch is not None and train_batch < 1:
            raise ValueError(f"train batch must be >= 1, got {train_batch}")
        known = [step_id for step_id, _, _ in STEPS]
        if steps is not None and (not steps or set(steps) - set(known)):
            raise ValueError(f"unknown check steps {sorted(set(steps) - set(known)) or '(none given)'}; the steps are {', '.join(known)}")
        vocab = build_toy_tokenizer().vocab_size
        kernel = attention_impl or "cudnn"  # on a CPU this checks cuDNN's refusal and the fallback to XLA
        images = 1 if quick else 8
        if quick:
            sd = quick_sd(vocab)
            unet = UNetBench(sd.unet, batch=CFG_COPIES * images, latent_size=8)
            layers = LayerBench(image_size=16, batch=1, layer_counts=(4,), enhancer_heads=2)
            # One train-step compile is most of the quick path's time: remat off only (tests/test_unet.py and the
            # multi-process training test run remat).
            remat_modes, repeats = (False,), {"unet": 2, "attention": 2, "ddim": 1, "train": 1}
        else:
            sd = SDBench(
                UNetConfig.sd15(), VAEConfig.sd15(), dataclasses.replace(CLIPTextConfig.sd15(), vocab_size=vocab),
                image_size=512, batch=images, steps=50,
            )
            unet = UNetBench(sd.unet, batch=CFG_COPIES * images, latent_size=64)
            # The train batch's search starts near the largest that fits an H100, as its compile without a GPU puts
            # it (docs/accelerators.md, "Ahead-of-time compiles for NVIDIA GPUs"): fewer compiles before the deadline.
            layers = LayerBench(image_size=256, batch=16, layer_counts=(4,), enhancer_heads=8)
            # remat off first: its step's HLO has no recomputation, so it gives the model FLOPs for both.
            remat_modes, repeats = (False, True), {"unet": 10, "attention": 5, "ddim": 3, "train": 5}
        bench = BenchSettings(device, quick, "bfloat16", kernel, repeats["unet"], unet, sd, layers, peak_flops)
        return cls(
            bench, images, _attention_cases(quick), remat_modes, train_batch, repeats, deadline_s,
            # quick: only TorchDynamo's tracing (inductor's C++ compile takes minutes on a small CPU)
            torch_compile_backend="eager" if quick else "inductor",
            steps=tuple(step_id for step_id in known if steps is None or step_id in steps),
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------- the time box


class CheckRun:
    """The check's results, written to DIR/check.json and DIR/check.md after every row, and its deadline.

    `step` runs one step unless the deadline has passed, recording rows as the step emits them; an exception
    ends that step only (recorded as a failed row). A watchdog thread stops the process at the deadline with
    exit status 3, after recording which step it stopped (`exit` is replaceable for tests)."""

    def __init__(
        self, out_dir: str | Path, deadline_s: float, *, plan: list[tuple[str, str]], header: dict[str, Any],
        started: float | None = None, exit: Callable[[int], None] = os._exit,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic() if started is None else started
        self.deadline_s = deadline_s
        self._lock = threading.RLock()
        self._exit = exit
        self.result: dict[str, Any] = {
            "suite": "check",
            **header,
            "deadline_s": deadline_s,
            "steps": [{"id": step_id, "title": title, "status": "pending"} for step_id, title in plan],
            "rows": [],
            "stopped": None,
        }
        self.result.setdefault("load_average", {"start": measure.load_average()})
        self._last_load = self.result["load_average"]["start"][0]
        self._watchdog = threading.Timer(max(self.time_left(), 0.0), self._on_deadline)
        self._watchdog.daemon = True
        self._watchdog.start()
        self.write()

    def time_left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    @property
    def json_path(self) -> Path:
        return self.out_dir / "check.json"

    @property
    def markdown_path(self) -> Path:
        return self.out_dir / "check.md"

    def _step(self, step_id: str) -> dict[str, Any]:
        return next(s for s in self.result["steps"] if s["id"] == step_id)

    def write(self) -> None:
        """Both files, each replaced whole (written beside, then renamed), so a reader never sees half a file."""
        with self._lock:
            self.result["elapsed_s"] = time.monotonic() - self.started
            self.result["load_average"]["end"] = measure.load_average()
            for path, text in (
                (self.json_path, json.dumps(self.result, indent=2, default=str) + "\n"),
                (self.markdown_path, report.format_table(self.result) + "\n"),
            ):
                partial = path.with_name(path.name + ".partial")
                partial.write_text(text)
                partial.replace(path)

    def add(self, row: Row) -> Row:
        """Records a row and writes both files. A row that did not record the load itself (correctness rows,
        failures) gets the load when the previous row was added and now; one with times is judged by it."""
        load = measure.load_average()[0]
        with self._lock:
            if "load_before" not in row:
                fields = measure.load_fields(self._last_load, load)
                row.update(fields if "median_s" in row else {k: fields[k] for k in ("load_before", "load_after", "cores")})
            self._last_load = load
            row.setdefault("status", "ok")
            self.result["rows"].append(row)
            self.write()
        log.info("check row %s %s [%s]: %s", row["row"], row.get("impl", ""), row["status"], report.row_summary(row))
        return row

    def step(self, step_id: str, function: Callable[["CheckRun"], None]) -> bool:
        """Runs `function(self)` as step `step_id`; False if it did not run or raised."""
        step = self._step(step_id)
        if self.time_left() <= 0:
            with self._lock:
                step["status"] = "not run"
                step["reason"] = f"the deadline ({self.deadline_s:.0f} s) had passed"
                self.write()
            return False
        with self._lock:
            step.update(status="running", started_s=time.monotonic() - self.started)
            self.write()
        log.info("check step %s: %s (%.0f s left)", step_id, step["title"], self.time_left())
        start = time.monotonic()
        try:
            function(self)
        except Exception as error:  # noqa: BLE001 - one step's failure must not cost the slot's other rows
            log.exception("check step %s failed", step_id)
            row = failed_row(step_id, step["title"], "", error)
            with self._lock:
                step.update(status="failed", elapsed_s=time.monotonic() - start, error=row["error"])
                self.add(row)
            gc.collect()
            return False
        with self._lock:
            step.update(status="done", elapsed_s=time.monotonic() - start)
            self.write()
        return True

    def _on_deadline(self) -> None:
        with self._lock:
            running = [s["id"] for s in self.result["steps"] if s["status"] == "running"]
            self.result["stopped"] = (
                f"deadline ({self.deadline_s:.0f} s) reached" + (f" during step {running[0]}" if running else "")
            )
            for s in self.result["steps"]:
                if s["status"] in ("pending", "running"):
                    s["reason"] = "stopped at the deadline" if s["status"] == "running" else "the deadline had passed"
                    s["status"] = "stopped" if s["status"] == "running" else "not run"
            self.write()
        log.warning("check: %s; results so far in %s", self.result["stopped"], self.out_dir)
        print(report.format_table(self.result), flush=True)
        self._exit(EXIT_DEADLINE)

    def finish(self) -> int:
        """Stops the watchdog; the exit status: 0, 1 if a step or a row failed, 3 if a step did not run."""
        self._watchdog.cancel()
        with self._lock:
            self.write()
            statuses = {s["status"] for s in self.result["steps"]} | {r["status"] for r in self.result["rows"]}
        if "not run" in statuses:
            return EXIT_DEADLINE
        return EXIT_STEP_FAILED if "failed" in statuses else 0


# ------------------------------------------------------------------------------------------- the steps


@dataclasses.dataclass
class Context:
    """What later steps reuse from earlier ones; each piece is built where first needed, so a step still runs
    after an earlier one failed."""

    settings: CheckSettings
    torch_device: Any = None
    pair: UNetPair | None = None
    compiled_forward: dict[str, tuple[Any, float]] = dataclasses.field(default_factory=dict)  # impl -> (compiled, s)
    forward_fallbacks: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # impl -> XLA fallbacks traced
    forward_args: tuple | None = None
    forward_flops: float | None = None
    best_impl: str | None = None
    ours_forward_s: float | None = None
    sd: Any = None
    train_setup_s: float | None = None  # LayerDiff from SD and the AdamW state: not in any row's compile time
    train_flops_per_sample: float | None = None

    @property
    def bench(self) -> BenchSettings:
        return self.settings.bench

    def unet_pair(self) -> UNetPair:
        if self.pair is None:
            b = self.bench.unet
            self.pair = build_unet_pair(b.config, b.batch, b.latent_size, b.context_length)
        return self.pair

    def bf16_args(self) -> tuple:
        if self.forward_args is None:
            self.forward_args = self.unet_pair().ours_args(self.bench.dtype)
        return self.forward_args

    def forward(self, impl: str) -> tuple[Any, float]:
        """Ours compiled at the check's batch in bfloat16 with `impl` attention: (executable, compile seconds)."""
        if impl not in self.compiled_forward:
            program = jax.jit(unet_forward(self.bench.unet.config, self.bench.dtype, impl))
            with attention.recorded_fallbacks() as fallbacks:
                compiled, seconds = measure.compile_jitted(program, *self.bf16_args())
            self.compiled_forward[impl] = (compiled, seconds)
            self.forward_fallbacks[impl] = sorted(set(fallbacks))
            if impl == "xla" and self.forward_flops is None:
                self.forward_flops = measure.matmul_flops(program, *self.bf16_args())
        return self.compiled_forward[impl]

    def model_flops(self) -> float | None:
        """FLOPs of one forward of the XLA-attention program (`measure.matmul_flops`): a kernel's own program
        hides its attention from the count, so every impl's MFU uses this one."""
        if self.forward_flops is None:
            self.forward("xla")
        return self.forward_flops

    def impl(self) -> str:
        """The attention implementation c and d use: the faster in b, else the settings' kernel."""
        return self.best_impl or self.bench.attention_impl

    def sd_components(self):
        """SD components around the check's UNet (torch: random VAE and text encoder; ours: the same weights)."""
        if self.sd is None:
            self.sd = build_sd(dataclasses.replace(self.bench, attention_impl=self.impl()), unet=self.unet_pair())
        return self.sd

    def release_forward(self) -> None:
        """Ours' bfloat16 forward programs and their arguments are not needed after b: memory back for c and d."""
        self.compiled_forward.clear()
        self.forward_args = None
        gc.collect()


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def _kernel_runs_here(impl: str, dtype: str) -> bool:
    """Whether `impl` runs its own kernel on this backend (for a plain call: no mask, a small head dim)."""
    probe = jnp.zeros((1, 2, 1, 64), jnp.dtype(dtype))
    return impl != "xla" and attention.kernel_refusal(impl, probe, probe) is None


@contextlib.contextmanager
def _full_float32_precision():
    """float32 matmuls and convolutions without TF32 on both sides: a correctness reference, not a speed."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def step_a1_unet_correctness(ctx: Context, run: CheckRun) -> None:
    from layerdiff_jax.bench import torch_reference as ref

    b, dtype = ctx.bench.unet, ctx.bench.dtype
    pair = ctx.unet_pair()
    shape = f"B={b.batch}, {b.latent_size}x{b.latent_size} latents, {b.context_length}x{b.config.cross_attention_dim} context"
    with _full_float32_precision():
        torch_unet = ref.to_device(pair.torch_unet, ctx.torch_device, "float32")
        reference = nhwc_numpy(torch_unet_call(torch_unet, pair.torch_args(ctx.torch_device, "float32"), ctx.torch_device)())
        args32 = pair.ours_args("float32")
        compiled, compile_s = measure.compile_jitted(jax.jit(unet_forward(b.config, "float32", "xla")), *args32)
        ours32 = np.asarray(compiled(*args32))
    del args32, compiled
    row = _row("a1", f"UNet forward vs torch float32 ({shape}, float32, no TF32)", "ours xla", None, compile_s=compile_s,
               **error_fields(ours32, reference))
    run.add(add_target(row, "relative error", row["rel_err"], FLOAT32_REL_TARGET, at_least=False))

    torch_unet = ref.to_device(pair.torch_unet, ctx.torch_device, dtype)  # in place: float32 is not kept
    torch_out = nhwc_numpy(torch_unet_call(torch_unet, pair.torch_args(ctx.torch_device, dtype), ctx.torch_device)())
    torch_error = error_fields(torch_out, reference)
    run.add(_row("a1", f"UNet forward vs torch float32 ({shape}, {dtype})", "torch", None, **torch_error))
    kernel = ctx.bench.attention_impl
    compiled, compile_s = ctx.forward(kernel)
    fallbacks = ctx.forward_fallbacks[kernel]
    ours = np.asarray(compiled(*ctx.bf16_args())).astype(np.float32)
    ours_row = _row(
        "a1", f"UNet forward vs torch float32 ({shape}, {dtype})", f"ours {kernel}", None, compile_s=compile_s,
        **error_fields(ours, reference), vs_torch_same_dtype=error_fields(ours, torch_out), attention_fallbacks=fallbacks,
    )
    if fallbacks:
        ours_row["note"] = "fell back to XLA: " + "; ".join(fallbacks)
    bound = BF16_ERROR_SLACK * torch_error["rel_err"]
    add_target(ours_row, f"relative error (torch {dtype}: {torch_error['rel_err']:.1e})", ours_row["rel_err"], bound, at_least=False)
    run.add(ours_row)


def _attention_inputs(case: AttentionCase, seed: int) -> tuple:
    """(q, k, v, key mask or None, output cotangent) as float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((case.batch, case.q_len, case.heads, case.head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((case.batch, case.kv_len, case.heads, case.head_dim)).astype(np.float32) for _ in range(2))
    mask = None
    if case.key_mask:  # the last quarter of the keys are padding
        mask = np.broadcast_to(np.arange(case.kv_len) < case.kv_len - case.kv_len // 4, (case.batch, case.kv_len))
        mask = np.ascontiguousarray(mask[:, None, None, :])
    return q, k, v, mask, rng.standard_normal(q.shape).astype(np.float32)


def _attention_program(impl: str, with_mask: bool):
    """jit((q, k, v, mask)) -> (output, grads of sum(output * cotangent) wrt q, k, v): forward and backward."""

    def loss(q, k, v, mask, cotangent):
        out = attention.dot_product_attention(q, k, v, mask=mask if with_mask else None, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    def run(q, k, v, mask, cotangent):
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, mask, cotangent)
        return out, grads

    return jax.jit(run)


def step_a2_attention(ctx: Context, run: CheckRun) -> None:
    kernel = ctx.bench.attention_impl
    for index, case in enumerate(ctx.settings.attention_cases):
        name = (
            f"attention {case.name}: {case.heads}x{case.head_dim} heads, {case.q_len} queries, {case.kv_len} keys"
            f"{', key mask' if case.key_mask else ''} (B={case.batch}, {ctx.bench.dtype}, forward+backward)"
        )
        inputs = _attention_inputs(case, seed=index)
        reference = None
        for impl in dict.fromkeys(("xla", kernel)):
            try:  # a kernel that raises on one shape must not cost the other cases
                reference = reference or _attention_reference(*inputs)
                run.add(_attention_row(ctx, name, impl, inputs, reference))
            except Exception as error:  # noqa: BLE001
                log.exception("check step a2: %s with %s failed", case.name, impl)
                run.add(failed_row("a2", name, impl, error))


def _attention_reference(q, k, v, mask, cotangent) -> tuple:
    """float32 XLA attention at full matmul precision: (output, gradients wrt q, k, v) on the host."""
    program = _attention_program("xla", mask is not None)
    with jax.default_matmul_precision("highest"):
        return jax.device_get(program(*(jnp.asarray(x) for x in (q, k, v)), _mask_arg(mask), jnp.asarray(cotangent)))


def _mask_arg(mask):
    return jnp.asarray(mask if mask is not None else np.ones((1, 1, 1, 1), bool))  # unused without a mask


def _attention_row(ctx: Context, name: str, impl: str, inputs: tuple, reference: tuple) -> Row:
    q, k, v, mask, cotangent = inputs
    ref_out, ref_grads = reference
    low = tuple(jnp.asarray(x, jnp.dtype(ctx.bench.dtype)) for x in (q, k, v))
    refusal = attention.kernel_refusal(impl, low[0], low[1], mask=mask)
    args = (*low, _mask_arg(mask), jnp.asarray(cotangent))
    compiled, compile_s = measure.compile_jitted(_attention_program(impl, mask is not None), *args)
    out, grads = jax.device_get(compiled(*args))
    timing, fields = measure.timed(lambda: jax.block_until_ready(compiled(*args)), ctx.settings.repeats["attention"], compile_s=compile_s)
    grad_error = max(error_fields(np.asarray(g, np.float32), r)["rel_err"] for g, r in zip(grads, ref_grads))
    row = _row(
        "a2", name, impl if refusal is None else f"{impl} -> xla", timing,
        **error_fields(np.asarray(out, np.float32), ref_out), grad_rel_err=grad_error,
        ran="xla" if refusal is not None else impl, refusal=refusal, **fields,
    )
    if refusal is not None:
        row["note"] = f"{impl} refused ({refusal}); XLA attention ran"
    add_target(row, "relative error", row["rel_err"], ATTENTION_BF16_REL_TARGET, at_least=False)
    return add_target(row, "gradient relative error", grad_error, ATTENTION_BF16_REL_TARGET, at_least=False)


def step_b_unet_speed(ctx: Context, run: CheckRun) -> None:
    from layerdiff_jax.bench import torch_reference as ref

    b, dtype, repeats = ctx.bench.unet, ctx.bench.dtype, ctx.settings.repeats["unet"]
    device = jax.devices()[0]
    name = (
        f"UNet forward ({_images(ctx.settings.images)} x {CFG_COPIES} for CFG, {b.latent_size}x{b.latent_size} latents, "
        f"{b.context_length}x{b.config.cross_attention_dim} context, {dtype})"
    )
    impls = []
    for impl in dict.fromkeys(("xla", ctx.bench.attention_impl)):
        try:
            ctx.forward(impl)  # compiles what a1 did not
            impls.append(impl)
        except Exception as error:  # noqa: BLE001 - a kernel that does not compile must not cost XLA's row
            log.exception("check step b: compiling the UNet with %s attention failed", impl)
            run.add(failed_row("b", name, f"ours {impl}", error))
    pair = ctx.unet_pair()
    torch_unet = ref.to_device(pair.torch_unet, ctx.torch_device, dtype)
    torch_timing, torch_fields = measure.timed(
        torch_unet_call(torch_unet, pair.torch_args(ctx.torch_device, dtype), ctx.torch_device), repeats, torch_device=ctx.torch_device
    )
    flops = ctx.model_flops()
    reference = _row("b", name, "torch eager (SDPA)", torch_timing, images_per_s=ctx.settings.images / torch_timing.median,
                     **torch_fields, **flops_fields(flops, torch_timing.median, device, ctx.bench.peak_flops))
    ours_rows = []
    for impl in impls:
        compiled, compile_s = ctx.forward(impl)
        timing, fields = measure.timed(lambda: jax.block_until_ready(compiled(*ctx.bf16_args())), repeats, compile_s=compile_s)
        row = _row(
            "b", name, f"ours {impl}", timing, images_per_s=ctx.settings.images / timing.median,
            xla_step_bytes=measure.compiled_memory_bytes(compiled), attention_fallbacks=ctx.forward_fallbacks[impl], **fields,
            **flops_fields(flops, timing.median, device, ctx.bench.peak_flops),
        )
        _compare(row, reference, higher_is_better=True, target=UNET_SPEEDUP_TARGET, name="speed-up vs torch eager (SDPA)")
        add_target(row, "MFU", row["mfu"], UNET_MFU_TARGET, at_least=True, unit="%")
        add_target(row, "compile", compile_s, COMPILE_TARGET_S, at_least=False, unit=" s")
        ours_rows.append(run.add(row))
    run.add(reference)
    if ours_rows:
        fastest = min(ours_rows, key=lambda r: r["median_s"])
        ctx.best_impl, ctx.ours_forward_s = fastest["impl"].removeprefix("ours "), fastest["median_s"]


def step_c_ddim(ctx: Context, run: CheckRun) -> None:
    settings = dataclasses.replace(ctx.bench, attention_impl=ctx.impl(), repeats=ctx.settings.repeats["ddim"])
    ctx.release_forward()
    sd = ctx.sd_components()
    with attention.recorded_fallbacks() as fallbacks:
        ours, reference = bench_ddim(settings, sd, row="c")
    ours.update(impl=f"ours {ctx.impl()}", attention_fallbacks=sorted(set(fallbacks)))
    add_target(ours, "compile", ours["compile_s"], COMPILE_TARGET_S, at_least=False, unit=" s")
    run.add(ours)
    run.add(reference)


def fit_batch(
    compile_at: Callable[[int], tuple[Any, int | None, float]], start: int, available: int | None, *,
    time_left: Callable[[], float], max_compiles: int = 3, margin: float = FIT_MARGIN,
) -> tuple[int, Any, list[dict[str, Any]]]:
    """The largest batch whose program fits `margin` of `available` bytes, in at most `max_compiles` compiles.

    `compile_at(batch)` -> (compiled, bytes its call needs or None, compile seconds). Bytes are modelled as
    linear in the batch, fitted through the compiles so far (through zero after the first, which overstates
    each sample's share, so the second guess errs small). Stops early when the next compile would not fit in
    the time left. Without `available` (CPU) or a memory figure, `start` is taken as it is. Returns (batch,
    compiled, every try) or raises MemoryError when not even batch 1 fits."""
    tries: list[dict[str, Any]] = []
    best: tuple[int, Any] | None = None
    batch = start
    while True:
        compiled, need, compile_s = compile_at(batch)
        tries.append({"batch": batch, "bytes": need, "compile_s": compile_s})
        if available is None or need is None:
            return batch, compiled, tries
        budget = margin * available
        fits = need <= budget
        if fits and (best is None or batch > best[0]):
            best = (batch, compiled)
        points = sorted({(t["batch"], t["bytes"]) for t in tries})
        if len(points) >= 2:
            (b0, m0), (b1, m1) = points[0], points[-1]
            per_sample = max((m1 - m0) / (b1 - b0), 1.0)
            fixed = m1 - per_sample * b1
        else:
            per_sample, fixed = need / batch, 0.0
        estimate = int((budget - fixed) // per_sample)
        if estimate >= 8:
            estimate -= estimate % 4  # multiples of 4: friendlier tiles
        tried = {t["batch"] for t in tries}
        if fits:
            next_batch = estimate if estimate >= 1.25 * batch else None
        else:
            next_batch = max(min(estimate, batch - 1), 1) if batch > 1 else None
        out_of_time = time_left() < 2.5 * compile_s
        if next_batch is None or next_batch in tried or len(tries) >= max_compiles or out_of_time:
            if best is None:
                raise MemoryError(
                    f"no train batch fits: batch {batch} needs {need / 2**30:.1f} GiB of {available / 2**30:.1f} GiB"
                    + ("" if batch == 1 else f" (tried {sorted(tried)}; stopped: {'time' if out_of_time else 'compiles'})")
                )
            return best[0], best[1], tries
        batch = next_batch


def step_d_train(ctx: Context, run: CheckRun) -> None:
    s, b = ctx.settings, ctx.bench.layers
    sd = ctx.sd_components()
    ctx.release_forward()
    sd.pipeline.to("cpu")  # torch's modules are for b' only (it moves the UNet back): the device is the step's now
    _empty_torch_cache(ctx)
    start = time.perf_counter()
    training = layer_training(
        sd, dtype=ctx.bench.dtype, attention_impl=ctx.impl(), max_layers=b.layer_counts[0], enhancer_heads=b.enhancer_heads
    )
    ctx.train_setup_s = time.perf_counter() - start
    try:
        for remat in s.remat_modes:
            try:
                run.add(_train_row(ctx, run, training, remat))
            except Exception as error:  # noqa: BLE001 - the other remat mode may still fit and run
                log.exception("check step d, remat %s failed", "on" if remat else "off")
                run.add(failed_row("d", f"LayerDiff train step, remat {'on' if remat else 'off'}", f"ours {ctx.impl()}", error))
    finally:
        training.delete()
        gc.collect()


def _train_row(ctx: Context, run: CheckRun, training, remat: bool) -> Row:
    """One remat mode of step d: the largest batch that fits, then the timed step."""
    s, b = ctx.settings, ctx.bench.layers
    num_layers = b.layer_counts[0]
    device = jax.devices()[0]
    step = training.make_step(remat)
    resident = sum(x.nbytes for x in jax.tree.leaves((training.state, training.frozen, training.empty_context)))
    available = measure.device_available_bytes()

    def compile_at(batch: int):
        compiled = compile_layer_step(training, step, training.batch(batch, num_layers, b.image_size))
        return compiled, compiled.memory_bytes, compiled.compile_s

    start = s.train_batch or b.batch
    with attention.recorded_fallbacks() as fallbacks:
        batch, compiled, tries = fit_batch(
            compile_at, start, None if (available is None or s.train_batch) else available + resident,
            time_left=run.time_left, max_compiles=1 if s.train_batch else 3,
        )
    timing, fields = time_layer_step(training, compiled, s.repeats["train"])
    flops = compiled.flops
    note = None
    if not remat and flops is not None:
        ctx.train_flops_per_sample = flops / batch
    elif remat:
        # The model's FLOPs exclude remat's recomputed forward: they are the remat-off step's, scaled by the batch
        # (all but the optimizer update grows linearly with it; that update is tens of FLOPs per parameter, far
        # below one sample's forward and backward).
        flops = None if ctx.train_flops_per_sample is None else ctx.train_flops_per_sample * batch
        if flops is None:
            note = "no MFU: the model FLOPs come from the remat-off step, which did not run"
    if _kernel_runs_here(ctx.impl(), ctx.bench.dtype):
        note = (note + "; " if note else "") + f"{ctx.impl()} attention calls are not in the FLOP count: MFU is a lower bound"
    row = _row(
        "d", f"LayerDiff train step, L={num_layers} ({b.image_size}x{b.image_size}, AdamW, {ctx.bench.dtype}, "
        f"remat {'on' if remat else 'off'}, B={batch})",
        f"ours {ctx.impl()}", timing, layers=num_layers, remat=remat, batch=batch, batch_tries=tries,
        attention_fallbacks=sorted(set(fallbacks)), setup_s=ctx.train_setup_s,
        samples_per_s=batch / timing.median, xla_step_bytes=compiled.memory_bytes, **fields,
        **flops_fields(flops, timing.median, device, ctx.bench.peak_flops),
    )
    if available is not None:
        row["device_available_bytes"] = available + resident
    if note:
        row["note"] = note
    add_target(row, "MFU", row["mfu"], TRAIN_MFU_TARGET, at_least=True, unit="%")
    add_target(row, "compile", compiled.compile_s, COMPILE_TARGET_S, at_least=False, unit=" s")
    return row


def step_b_torch_compile(ctx: Context, run: CheckRun) -> None:
    import torch

    from layerdiff_jax.bench import torch_reference as ref

    b, dtype = ctx.bench.unet, ctx.bench.dtype
    pair = ctx.unet_pair()
    torch_unet = ref.to_device(pair.torch_unet, ctx.torch_device, dtype)
    compiled_unet = torch.compile(torch_unet, backend=ctx.settings.torch_compile_backend)
    call = torch_unet_call(compiled_unet, pair.torch_args(ctx.torch_device, dtype), ctx.torch_device)
    start = time.perf_counter()
    call()  # compiles
    first_s = time.perf_counter() - start
    timing, fields = measure.timed(call, ctx.settings.repeats["unet"], torch_device=ctx.torch_device)
    timing.compile_s = max(first_s - timing.median, 0.0)
    name = (
        f"UNet forward ({_images(ctx.settings.images)} x {CFG_COPIES} for CFG, {b.latent_size}x{b.latent_size} latents, "
        f"{dtype}), torch.compile backend {ctx.settings.torch_compile_backend}"
    )
    row = _row("b'", name, "torch.compile", timing, images_per_s=ctx.settings.images / timing.median, **fields,
               **flops_fields(ctx.model_flops(), timing.median, jax.devices()[0], ctx.bench.peak_flops))
    if ctx.ours_forward_s is not None:
        row.update(ratio=timing.median / ctx.ours_forward_s, ratio_name=f"ours ({ctx.impl()}) speed-up vs this")
    run.add(row)


def _empty_torch_cache(ctx: Context) -> None:
    import torch

    gc.collect()
    if ctx.torch_device is not None and ctx.torch_device.type == "cuda":
        torch.cuda.empty_cache()


STEPS: tuple[tuple[str, str, Callable[[Context, CheckRun], None]], ...] = (
    ("a1", "UNet forward correctness, ours vs torch, float32 and bfloat16", step_a1_unet_correctness),
    ("a2", "attention: XLA vs the device kernel at SD-1.5's head dims", step_a2_attention),
    ("b", "UNet forward speed, ours (XLA, kernel) vs torch eager (SDPA)", step_b_unet_speed),
    ("c", "DDIM 50 steps + CFG text-to-image, ours vs diffusers", step_c_ddim),
    ("d", "LayerDiff train step, largest batch, remat off and on", step_d_train),
    ("b'", "UNet forward under torch.compile", step_b_torch_compile),
)


def run_check(
    settings: CheckSettings, out_dir: str | Path, *, started: float | None = None, exit: Callable[[int], None] = os._exit,
) -> int:
    """Runs the settings' steps in order within the deadline, writing DIR/check.json and DIR/check.md after each row;
    returns the exit status (0; 1 if a step failed; 3 if the deadline left a step unrun)."""
    from layerdiff_jax.bench import torch_reference as ref

    environment = suite_environment(settings.bench)
    environment["peak_bf16_flops"] = measure.peak_bf16_flops(jax.devices()[0], settings.bench.peak_flops)
    run = CheckRun(
        out_dir, settings.deadline_s, plan=[(step_id, title) for step_id, title, _ in STEPS if step_id in settings.steps],
        header={"environment": environment, "settings": settings.as_dict()}, started=started, exit=exit,
    )
    ctx = Context(settings, torch_device=ref.torch_device(settings.bench.device))
    with quick_compilation(settings.bench.quick):
        for step_id, _, function in STEPS:
            if step_id in settings.steps:
                run.step(step_id, lambda r, f=function: f(ctx, r))
    status = run.finish()
    log.info("check finished (exit status %d) in %.0f s: %s", status, run.result["elapsed_s"], run.json_path)
    return status
