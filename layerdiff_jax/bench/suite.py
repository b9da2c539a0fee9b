"""The benchmark rows (issue 9), each measured warm in this process, and their settings per device.

1. SD-1.5-structure UNet forward and forward+backward: ours vs diffusers' torch UNet, same config and weights.
2. 50-step DDIM text-to-image with classifier-free guidance: ours (one jitted program) vs diffusers'
   `StableDiffusionPipeline` built from the same torch components; images/s.
3. The LayerDiff training step (`layerdiff_jax.training.step.make_train_step`) at L = 2, 3, 4, 8 layers.
4. Memory per step: XLA's planned peak per call, the allocator peak on accelerators, host RSS on CPU.
5. Model FLOPs per step from XLA's cost analysis, and MFU against the chip's bfloat16 peak (accelerators).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.bench import measure
from layerdiff_jax.convert import load_sd
from layerdiff_jax.convert.core import convert_state_dict
from layerdiff_jax.convert.unet import abstract_unet_params, rename
from layerdiff_jax.data.tokenizer import PromptTokenizer, build_toy_tokenizer
from layerdiff_jax.diffusion.ddim import ddim_sample, ddim_timesteps
from layerdiff_jax.diffusion.guidance import guided_model_fn
from layerdiff_jax.diffusion.schedules import make_schedule
from layerdiff_jax.models.clip_text import CLIPTextConfig
from layerdiff_jax.models.layerdiff import LayerDiffConfig, init_from_sd
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

Row = dict[str, Any]
# Prompts from the toy tokenizer's vocabulary (the offline stand-in for CLIP's BPE on every side).
PROMPTS = (
    "a red circle on a blue background",
    "a green square and a yellow triangle",
    "an orange star with a purple stripe pattern",
    "a blue triangle on a white background",
)
GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default
LAYER_TARGET_RATIO = 4.4  # issue 9: step time at L = 8 at most 4.4x the time at L = 2


@dataclasses.dataclass(frozen=True)
class UNetBench:
    config: UNetConfig
    batch: int
    latent_size: int
    context_length: int = 77


@dataclasses.dataclass(frozen=True)
class SDBench:
    """The SD components rows 2 and 3 share, and row 2's sampling settings."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig
    image_size: int
    batch: int
    steps: int


@dataclasses.dataclass(frozen=True)
class LayerBench:
    image_size: int
    batch: int
    layer_counts: tuple[int, ...]
    enhancer_heads: int
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    device: str  # "cpu" | "gpu"
    quick: bool
    dtype: str  # compute dtype on both sides
    attention_impl: str
    repeats: int
    unet: UNetBench
    sd: SDBench
    layers: LayerBench

    @classmethod
    def for_device(cls, device: str, quick: bool = False, attention_impl: str | None = None) -> "BenchSettings":
        """CPU: a mid-size SD-structure UNet and a small SD; GPU: SD-1.5 sizes in bfloat16; quick: toy sizes."""
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        vocab = build_toy_tokenizer().vocab_size
        if quick:
            sd = _toy_sd(vocab)
            return cls(
                device, True, "float32" if device == "cpu" else "bfloat16", attention_impl or _default_impl(device), 2,
                UNetBench(sd.unet, batch=1, latent_size=8, context_length=77),
                sd,
                LayerBench(image_size=16, batch=1, layer_counts=(2,), enhancer_heads=2),  # one train-step compile
            )
        if device == "cpu":
            mid_unet = UNetConfig(block_out_channels=(64, 128, 256, 256), cross_attention_dim=768)
            return cls(
                "cpu", False, "float32", attention_impl or "xla", 5,
                UNetBench(mid_unet, batch=4, latent_size=32),
                _small_sd(vocab, width=32, image_size=64, batch=2, steps=50),
                LayerBench(image_size=64, batch=2, layer_counts=(2, 3, 4, 8), enhancer_heads=4),
            )
        sd15 = SDBench(
            UNetConfig.sd15(), VAEConfig.sd15(), dataclasses.replace(CLIPTextConfig.sd15(), vocab_size=vocab),
            image_size=512, batch=4, steps=50,
        )
        return cls(
            "gpu", False, "bfloat16", attention_impl or "cudnn", 10,
            UNetBench(UNetConfig.sd15(), batch=8, latent_size=64),
            sd15,
            LayerBench(image_size=256, batch=2, layer_counts=(2, 3, 4, 8), enhancer_heads=8, remat=True),
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _default_impl(device: str) -> str:
    return "cudnn" if device == "gpu" else "xla"


def _small_sd(vocab: int, *, width: int, image_size: int, batch: int, steps: int) -> SDBench:
    """SD-1.x block types at small widths: 4-level UNet, a 4x VAE, a 2-layer CLIP text encoder."""
    text_width = 2 * width
    return SDBench(
        unet=UNetConfig(
            block_out_channels=(width, 2 * width, 4 * width, 4 * width),
            num_attention_heads=4,
            cross_attention_dim=text_width,
            norm_num_groups=8,
        ),
        vae=VAEConfig(block_out_channels=(width, 2 * width, 2 * width), layers_per_block=1, norm_num_groups=8),
        text_encoder=CLIPTextConfig(
            vocab_size=vocab, hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=2, num_attention_heads=4
        ),
        image_size=image_size,
        batch=batch,
        steps=steps,
    )



def _toy_sd(vocab: int) -> SDBench:
    """The smallest SD-1.x-structured set (2-level UNet, 2x VAE, 1-layer CLIP): compiles in seconds, for --quick."""
    return SDBench(
        unet=UNetConfig(
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            num_attention_heads=2,
            cross_attention_dim=16,
            norm_num_groups=8,
        ),
        vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
        text_encoder=CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        image_size=16,
        batch=1,
        steps=2,
    )

# ---------------------------------------------------------------------------------------------- helpers


def _row(row: str, name: str, impl: str, timing: measure.Timing | None, **fields) -> Row:
    out = {"row": row, "name": name, "impl": impl}
    if timing is not None:
        out.update(timing.as_dict())
    out.update(fields)
    return out


def _with_memory(settings: BenchSettings, run: Callable[[], measure.Timing]) -> tuple[measure.Timing, dict[str, Any]]:
    """Runs a measurement, recording host RSS (CPU) around it and the machine's load when it started."""
    load = measure.load_average()[0]
    with measure.RssPeak() as rss:
        timing = run()
    memory = {**rss.as_dict(), "load_1min": load}
    peak = measure.device_peak_bytes()
    if peak is not None:
        memory["device_peak_bytes"] = peak
    return timing, memory


def _flops_fields(flops: float | None, seconds: float, device: jax.Device) -> dict[str, Any]:
    if flops is None:
        return {"flops": None, "achieved_flops_per_s": None, "mfu": None}
    peak = measure.peak_bf16_flops(device) if device.platform != "cpu" else None
    rate = flops / seconds
    return {"flops": flops, "achieved_flops_per_s": rate, "mfu": rate / peak if peak else None}


def _compare(row: Row, reference: Row, *, higher_is_better: bool, target: float, name: str) -> Row:
    """Adds to `row` its ratio to `reference`: ours/torch time (target: at most), or speed-up (at least)."""
    if higher_is_better:
        ratio = reference["median_s"] / row["median_s"]
        met = ratio >= target
        text = f">= {target:g}x"
    else:
        ratio = row["median_s"] / reference["median_s"]
        met = ratio <= target
        text = f"<= {target:g}"
    row.update(ratio=ratio, ratio_name=name, target=text, met=bool(met))
    return row


# ------------------------------------------------------------------------------------------ row 1: UNet


def bench_unet(settings: BenchSettings) -> list[Row]:
    from layerdiff_jax.bench import torch_reference as ref
    import torch

    b = settings.unet
    dtype = jnp.dtype(settings.dtype)
    device = jax.devices()[0]
    torch_device = ref.torch_device(settings.device)
    torch_unet = ref.build_unet(b.config, seed=0)
    unet = UNet2DConditionModel(b.config, dtype=dtype, attention_impl=settings.attention_impl)
    params = convert_state_dict(ref.numpy_state_dict(torch_unet), abstract_unet_params(unet), rename)
    # "bfloat16 on both sides": the torch module holds bfloat16 weights, so ours gets them too.
    params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, dtype), params))
    torch_unet = ref.to_device(torch_unet, torch_device, settings.dtype)

    rng = np.random.default_rng(0)
    size, channels = b.latent_size, b.config.in_channels
    latents = rng.standard_normal((b.batch, size, size, channels)).astype(np.float32)
    timesteps = rng.integers(0, 1000, (b.batch,)).astype(np.int32)
    context = rng.standard_normal((b.batch, b.context_length, b.config.cross_attention_dim)).astype(np.float32)
    args = (params, jnp.asarray(latents, dtype), jnp.asarray(timesteps), jnp.asarray(context, dtype))

    def forward(p, x, t, c):
        return unet.apply({"params": p}, x, t, c)

    def loss(p, x, t, c):
        return jnp.mean(jnp.square(forward(p, x, t, c).astype(jnp.float32)))

    t_dtype = ref.TORCH_DTYPES[settings.dtype]
    tx = torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous().to(torch_device, t_dtype)
    tt = torch.from_numpy(timesteps).long().to(torch_device)
    tc = torch.from_numpy(context).to(torch_device, t_dtype)

    def torch_forward():
        with torch.inference_mode():
            out = torch_unet(tx, tt, tc).sample
        ref.synchronize(torch_device)
        return out

    def torch_forward_backward():
        torch_unet.zero_grad(set_to_none=True)
        torch_unet(tx, tt, tc).sample.float().square().mean().backward()
        ref.synchronize(torch_device)

    shape = f"B={b.batch}, {size}x{size} latents, {b.context_length}x{b.config.cross_attention_dim} context, {settings.dtype}"
    rows = []
    for label, program, torch_call, row_id in (
        ("UNet forward", jax.jit(forward), torch_forward, "1a"),
        ("UNet forward+backward", jax.jit(jax.grad(loss)), torch_forward_backward, "1b"),
    ):
        compiled, compile_s = measure.compile_jitted(program, *args)
        timing, memory = _with_memory(settings, lambda: measure.time_compiled(compiled, args, settings.repeats, compile_s))
        ours = _row(
            row_id, f"{label} ({shape})", "ours", timing,
            xla_step_bytes=measure.compiled_memory_bytes(compiled), **memory,
            **_flops_fields(measure.cost_flops(compiled), timing.median, device),
        )
        if torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch_timing, torch_memory = _with_memory(settings, lambda: measure.time_calls(torch_call, settings.repeats))
        if torch_device.type == "cuda":
            torch_memory["device_peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()  # give torch's cached blocks back before JAX allocates again
        reference = _row(row_id, f"{label} ({shape})", "torch", torch_timing, **torch_memory)
        rows += [_compare(ours, reference, higher_is_better=False, target=1.0, name="ours/torch time"), reference]

    if settings.dtype == "float32":  # parity of the two forwards: the same network with the same weights
        ours_out = np.asarray(jax.jit(forward)(*args))
        torch_out = torch_forward().float().permute(0, 2, 3, 1).cpu().numpy()
        rows[0]["note"] = f"max abs diff ours vs torch {np.abs(ours_out - torch_out).max():.1e}"
    return rows


# ---------------------------------------------------------------------------------- SD components (2, 3)


@dataclasses.dataclass
class SDComponents:
    unet: tuple[UNet2DConditionModel, Any]
    vae: tuple[AutoencoderKL, Any]
    text_encoder: tuple[Any, Any]
    tokenizer: PromptTokenizer
    pipeline: Any  # the diffusers StableDiffusionPipeline holding the same weights (float32, CPU)


def build_sd(settings: BenchSettings) -> SDComponents:
    """Random torch SD components saved as a diffusers folder, and ours loaded from that folder."""
    from layerdiff_jax.bench import torch_reference as ref

    s = settings.sd
    tokenizer = build_toy_tokenizer()
    configs = {"unet": s.unet, "vae": s.vae, "text_encoder": s.text_encoder}
    with tempfile.TemporaryDirectory() as folder:
        pipeline = ref.build_sd_pipeline(configs, tokenizer, folder, seed=0)
        loaded = load_sd(folder, dtype=jnp.dtype(settings.dtype), attention_impl=settings.attention_impl)
    loaded = {name: (module, jax.device_put(params)) for name, (module, params) in loaded.items()}
    return SDComponents(loaded["unet"], loaded["vae"], loaded["text_encoder"], tokenizer, pipeline)


# ------------------------------------------------------------------------------------ row 2: DDIM t2i


def txt2img_program(sd: SDComponents, num_steps: int, guidance_scale: float):
    """jit(params, ids, uncond_ids, noise) -> images in [0, 1]: text encoding, the whole DDIM loop with
    classifier-free guidance (one `lax.scan`) and VAE decoding, as one XLA program."""
    (unet, _), (vae, _), (text_encoder, _) = sd.unet, sd.vae, sd.text_encoder
    schedule = make_schedule()
    timesteps = ddim_timesteps(num_steps)

    def run(params, ids, uncond_ids, noise):
        cond = text_encoder.apply({"params": params["text_encoder"]}, ids)
        uncond = text_encoder.apply({"params": params["text_encoder"]}, uncond_ids)
        apply = lambda x, t, context: unet.apply({"params": params["unet"]}, x, t, context)  # noqa: E731
        latents = ddim_sample(guided_model_fn(apply, cond, uncond, guidance_scale), noise, timesteps, schedule)
        images = vae.apply({"params": params["vae"]}, latents.astype(vae.dtype), method=AutoencoderKL.decode_latents)
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    return jax.jit(run)


def bench_ddim(settings: BenchSettings, sd: SDComponents) -> list[Row]:
    from layerdiff_jax.bench import torch_reference as ref
    import torch

    s = settings.sd
    torch_device = ref.torch_device(settings.device)
    pipe = ref.to_device(sd.pipeline, torch_device, settings.dtype)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s.batch)]
    factor = 2 ** (len(s.vae.block_out_channels) - 1)
    latent = s.image_size // factor
    noise = np.random.default_rng(0).standard_normal((s.batch, latent, latent, s.vae.latent_channels)).astype(np.float32)
    params = {"unet": sd.unet[1], "vae": sd.vae[1], "text_encoder": sd.text_encoder[1]}

    program = txt2img_program(sd, s.steps, GUIDANCE_SCALE)
    dtype = jnp.dtype(settings.dtype)
    ids, uncond_ids = sd.tokenizer(prompts), sd.tokenizer([""] * len(prompts))
    compiled, compile_s = measure.compile_jitted(program, params, ids, uncond_ids, jnp.asarray(noise, dtype))

    def ours():  # prompts in, float images on the host out, like the pipeline call
        return np.asarray(compiled(params, sd.tokenizer(prompts), sd.tokenizer([""] * len(prompts)), jnp.asarray(noise, dtype)))

    torch_noise = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous().to(torch_device, ref.TORCH_DTYPES[settings.dtype])

    def diffusers_run():
        return pipe(
            prompts, height=s.image_size, width=s.image_size, num_inference_steps=s.steps, guidance_scale=GUIDANCE_SCALE,
            latents=torch_noise, output_type="np",
        ).images

    timing, memory = _with_memory(settings, lambda: measure.time_calls(ours, settings.repeats))
    timing.compile_s = compile_s
    torch_timing, torch_memory = _with_memory(settings, lambda: measure.time_calls(diffusers_run, settings.repeats))
    name = f"DDIM {s.steps} steps + CFG {GUIDANCE_SCALE:g}, text-to-image (B={s.batch}, {s.image_size}x{s.image_size}, {settings.dtype})"
    ours_row = _row("2", name, "ours", timing, images_per_s=s.batch / timing.median,
                    xla_step_bytes=measure.compiled_memory_bytes(compiled), **memory)
    reference = _row("2", name, "diffusers", torch_timing, images_per_s=s.batch / torch_timing.median, **torch_memory)
    if settings.dtype == "float32":
        ours_row["note"] = f"max abs image diff ours vs diffusers {np.abs(ours() - diffusers_run()).max():.1e}"
    return [_compare(ours_row, reference, higher_is_better=True, target=1.5, name="images/s ours/diffusers"), reference]


# -------------------------------------------------------------------------- row 3: LayerDiff train step


def _layer_batch(rng: np.random.Generator, batch: int, num_layers: int, size: int, tokenizer: PromptTokenizer) -> dict:
    """One micro-batch (grad_accum 1) in the train step's layout, every layer valid."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch * (num_layers + 1))]
    ids = tokenizer(prompts).reshape(batch, num_layers + 1, -1)
    return {
        "images": rng.uniform(-1, 1, (1, batch, num_layers, size, size, 3)).astype(np.float32),
        "masks": (rng.uniform(0, 1, (1, batch, num_layers, size, size, 1)) > 0.5).astype(np.float32),
        "global_ids": ids[None, :, 0],
        "layer_ids": ids[None, :, 1:],
        "layer_valid": np.ones((1, batch, num_layers), bool),
    }


def bench_layers(settings: BenchSettings, sd: SDComponents) -> list[Row]:
    from layerdiff_jax.training.config import base_config
    from layerdiff_jax.training.mesh import global_batch, logical_shardings, make_mesh, put_global
    from layerdiff_jax.training.state import abstract_boxed_state, abstract_state, create_train_state, make_optimizer
    from layerdiff_jax.training.step import FrozenEncoders, diffusion_loss, layerdiff_micro_loss, make_train_step, scheduler_from_config

    b = settings.layers
    device = jax.devices()[0]
    (unet, unet_params), (vae, vae_params), (text_encoder, text_params) = sd.unet, sd.vae, sd.text_encoder
    config = base_config()
    config.train.per_host_batch_size = b.batch
    config.train.grad_accum_steps = 1
    config.model.compute_dtype = settings.dtype
    config.model.attention_impl = settings.attention_impl
    config.model.remat = b.remat
    mesh = make_mesh((1, 1, 1), devices=[device])

    unet = unet.clone(remat=b.remat)
    layer_config = LayerDiffConfig(max_layers=max(b.layer_counts), enhancer_heads=b.enhancer_heads)
    model, params = init_from_sd(unet, unet_params, layer_config, jax.random.key(0))
    tx = make_optimizer(config.train)
    abstract, state_shardings = abstract_state(abstract_boxed_state(model, tx, ema=False), mesh)
    rng_data = np.asarray(jax.random.key_data(jax.random.key(1)))
    create = functools.partial(create_train_state, rng=rng_data, tx=tx, ema=False)
    state = jax.jit(create, out_shardings=state_shardings)(put_global(params, state_shardings.params))
    factor = vae.config.downsample_factor
    frozen_boxed = {
        "vae": jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, factor, factor, 3)))["params"],
        "text_encoder": jax.eval_shape(text_encoder.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"],
    }
    frozen_shardings = logical_shardings(frozen_boxed, mesh)
    frozen = put_global({"vae": vae_params, "text_encoder": text_params}, frozen_shardings)
    empty_context = jax.jit(text_encoder.apply)({"params": text_params}, sd.tokenizer([""]))[0]
    micro_loss = layerdiff_micro_loss(model, FrozenEncoders(vae, text_encoder), config)
    step = make_train_step(micro_loss, tx, config, mesh, state_shardings, frozen_shardings)
    schedule = scheduler_from_config(config.diffusion).make_schedule()

    rows, rng = [], np.random.default_rng(0)
    latent = b.image_size // factor
    for num_layers in b.layer_counts:
        batch = global_batch(_layer_batch(rng, b.batch, num_layers, b.image_size, sd.tokenizer), mesh, sample_axis=1)
        holder = {"state": state}

        def call():
            holder["state"], metrics = step(holder["state"], batch, frozen, empty_context)
            jax.block_until_ready((holder["state"], metrics))

        first = measure.time_calls(call, repeats=1, warmup=0).median  # compiles
        timing, memory = _with_memory(settings, lambda: measure.time_calls(call, settings.repeats))
        timing.compile_s = max(first - timing.median, 0.0)  # the first call's extra time
        state = holder["state"]
        # Model FLOPs: the LayerDiff loss forward+backward on this batch (encoders and optimizer excluded).
        latents = jnp.zeros((b.batch, num_layers, latent, latent, 2 * vae.config.latent_channels), jnp.float32)
        ctx_width = text_encoder.config.hidden_size
        loss_grad = jax.jit(jax.grad(lambda p, *a: diffusion_loss(model, p, *a, schedule, 0.5)[0]))
        lowered = loss_grad.lower(
            state.params, latents, jnp.zeros((b.batch, 77, ctx_width), settings.dtype),
            jnp.zeros((b.batch, num_layers, 77, ctx_width), settings.dtype), jnp.ones((b.batch, num_layers), bool), jax.random.key(0),
        )
        flops = measure.cost_flops(lowered)
        rows.append(_row(
            "3", f"LayerDiff train step, L={num_layers} (B={b.batch}, {b.image_size}x{b.image_size}, AdamW, {settings.dtype})",
            "ours", timing, layers=num_layers, samples_per_s=b.batch / timing.median, **memory,
            **_flops_fields(flops, timing.median, device),
        ))
    by_layers = {r["layers"]: r for r in rows}
    low = min(by_layers)
    for r in rows[1:]:
        r.update(ratio=r["median_s"] / by_layers[low]["median_s"], ratio_name=f"step time vs L={low}")
    if {2, 8} <= set(by_layers):  # the target: L = 8 at most 4.4x the step time of L = 2
        by_layers[8].update(target=f"<= {LAYER_TARGET_RATIO:g}", met=bool(by_layers[8]["ratio"] <= LAYER_TARGET_RATIO))
    return rows


# ------------------------------------------------------------------------------------------------ suite


ROWS = ("unet", "ddim", "layers")


def run_suite(settings: BenchSettings, rows: tuple[str, ...] = ROWS, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Every requested row, in this process; returns {"environment", "settings", "rows", "load_average"}."""
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown benchmark row(s) {unknown}; choose from {ROWS}")
    if settings.device == "cpu":
        from layerdiff_jax.bench import torch_reference as ref

        torch_threads = ref.set_cpu_threads()
    else:
        torch_threads = None
    result: dict[str, Any] = {
        "environment": {**measure.environment(), "torch_threads": torch_threads},
        "settings": settings.as_dict(),
        "load_average": {"start": measure.load_average()},
        "rows": [],
    }
    # --quick only checks that every row runs: compile without XLA's expensive passes (about half the
    # compile time on CPU), which makes its times meaningless.
    optimizations_were_disabled = bool(jax.config.read("jax_disable_most_optimizations"))
    jax.config.update("jax_disable_most_optimizations", settings.quick or optimizations_were_disabled)
    try:
        if "unet" in rows:
            progress("row 1: UNet forward / forward+backward, ours vs torch")
            result["rows"] += bench_unet(settings)
        if "ddim" in rows or "layers" in rows:
            sd = build_sd(settings)
            if "ddim" in rows:
                progress("row 2: DDIM text-to-image, ours vs diffusers")
                result["rows"] += bench_ddim(settings, sd)
            if "layers" in rows:
                progress("row 3: LayerDiff train step over layer counts")
                result["rows"] += bench_layers(settings, sd)
    finally:
        jax.config.update("jax_disable_most_optimizations", optimizations_were_disabled)
    result["load_average"]["end"] = measure.load_average()
    return result
