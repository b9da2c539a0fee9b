"""The benchmark rows, each measured warm in this process, and their settings per device.

1. SD-1.5-structure UNet forward and forward+backward: ours vs diffusers' torch UNet, same config and weights.
2. 50-step DDIM text-to-image with classifier-free guidance: ours (one jitted program) vs diffusers'
   `StableDiffusionPipeline` built from the same torch components; images/s.
3. The LayerDiff training step (`layerdiff_jax.training.step.make_train_step`) at L = 2, 3, 4, 8 layers.
4. Memory per step: XLA's planned peak per call, the allocator peak on accelerators, host RSS on CPU.
5. Model FLOPs per step counted on the jaxpr (`measure.matmul_flops`), and MFU against the chip's bfloat16 peak (accelerators).

Every measurement records the load average before and after it (`measure.timed`); a row measured above the
core count is unreliable and meets no target (`add_target`). The accelerator check (`check.py`) is built from the
same pieces: the UNet pair, the SD components, the DDIM row and the train-step helpers below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.bench import measure
from layerdiff_jax.convert.clip_text import abstract_text_encoder_params, rename_text_encoder_key
from layerdiff_jax.convert.core import convert_state_dict
from layerdiff_jax.convert.unet import abstract_unet_params, rename
from layerdiff_jax.convert.vae import abstract_vae_params, rename_vae_key
from layerdiff_jax.data.tokenizer import PromptTokenizer, build_toy_tokenizer
from layerdiff_jax.diffusion.ddim import ddim_timesteps
from layerdiff_jax.diffusion.schedules import make_schedule
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.layerdiff import LayerDiffConfig, init_from_sd
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig
from layerdiff_jax.sampling.text_to_image import text_to_image_program

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
LAYER_TARGET_RATIO = 4.4  # step time at L = 8 at most 4.4x the time at L = 2: layers cost about linearly
DDIM_SPEEDUP_TARGET = 1.5  # issues 9 and 19: ours at least 1.5x diffusers' pipeline in images/s


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
    peak_flops: float | None = None  # the chip's bfloat16 peak for MFU; None: measure.BF16_PEAK_FLOPS's entry

    @classmethod
    def for_device(
        cls, device: str, quick: bool = False, attention_impl: str | None = None, peak_flops: float | None = None
    ) -> "BenchSettings":
        """CPU: a mid-size SD-structure UNet and a small SD; GPU: SD-1.5 sizes in bfloat16; quick: toy sizes."""
        settings = cls._for_device(device, quick, attention_impl)
        return dataclasses.replace(settings, peak_flops=peak_flops)

    @classmethod
    def _for_device(cls, device: str, quick: bool, attention_impl: str | None) -> "BenchSettings":
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        vocab = build_toy_tokenizer().vocab_size
        if quick:
            sd = quick_sd(vocab)
            return cls(
                device, True, "float32" if device == "cpu" else "bfloat16", attention_impl or _default_impl(device), 2,
                UNetBench(sd.unet, batch=1, latent_size=8, context_length=77),
                sd,
                LayerBench(image_size=16, batch=1, layer_counts=(2,), enhancer_heads=2),  # one train-step compile
            )
        if device == "cpu":
            mid_unet = UNetConfig(block_out_channels=(64, 128, 256, 256), cross_attention_dim=768)
            return cls(
                "cpu", False, "float32", attention_impl or "cpu", 5,
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
    return "cudnn" if device == "gpu" else "cpu"


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



def quick_sd(vocab: int) -> SDBench:
    """--quick's SD: a one-level UNet (a cross-attention down block, the mid block, a cross-attention up block), a
    one-block VAE (no downsampling) and a one-layer CLIP. Every kind of module the rows run, with the fewest XLA
    ops, as --quick only checks that every row runs: the LayerDiff train step, most of its time on a CPU,
    compiles in a fraction of a two-level UNet's time."""
    return SDBench(
        unet=UNetConfig(
            block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            layers_per_block=1, num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8,
        ),
        vae=VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4),
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


def failed_row(row_id: str, name: str, impl: str, error: BaseException) -> Row:
    """A row for a measurement that raised (called while handling `error`: the traceback is the current one)."""
    return {
        "row": row_id, "name": name, "impl": impl, "status": "failed",
        "error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-4000:],
    }


def flops_fields(flops: float | None, seconds: float, device: jax.Device, peak_flops: float | None = None) -> dict[str, Any]:
    """FLOPs of one call, their rate, and MFU against the chip's bfloat16 peak (`peak_flops` overrides the table)."""
    if flops is None:
        return {"flops": None, "achieved_flops_per_s": None, "mfu": None}
    peak = measure.peak_bf16_flops(device, peak_flops) if device.platform != "cpu" else None
    rate = flops / seconds
    return {"flops": flops, "achieved_flops_per_s": rate, "mfu": rate / peak if peak else None}


def add_target(row: Row, what: str, value: float | None, bound: float, *, at_least: bool, unit: str = "") -> Row:
    """Adds a target to `row["targets"]` and recomputes `row["met"]`: True when every target is met, False when
    one is missed, None when the row was measured on a busy machine (unreliable) or a value is missing.
    `unit` "%" shows a fraction as a percentage."""
    met = None if value is None else bool(value >= bound if at_least else value <= bound)
    shown = f"{100 * bound:g}%" if unit == "%" else f"{bound:.3g}{unit}"
    row.setdefault("targets", []).append(
        {"what": what, "value": value, "target": f"{'>=' if at_least else '<='} {shown}", "met": met}
    )
    values = [t["met"] for t in row["targets"]]
    row["met"] = None if not row.get("reliable", True) or None in values else all(values)
    return row


def _compare(row: Row, reference: Row, *, higher_is_better: bool, target: float, name: str) -> Row:
    """Adds to `row` its ratio to `reference`, ours/torch time (target: at most) or speed-up (at least), as a
    target; unreliable if either side was measured on a busy machine."""
    if higher_is_better:
        ratio = reference["median_s"] / row["median_s"]
    else:
        ratio = row["median_s"] / reference["median_s"]
    if not reference.get("reliable", True) and row.get("reliable", True):
        row.update(reliable=False, unreliable=f"{reference['impl']} side: {reference['unreliable']}")
    row.update(ratio=ratio, ratio_name=name)
    return add_target(row, name, ratio, target, at_least=higher_is_better, unit="x" if higher_is_better else "")


# ------------------------------------------------------------------------------------------ row 1: UNet


@dataclasses.dataclass
class UNetPair:
    """diffusers' torch UNet with random weights (float32, CPU), the same weights converted for ours (numpy
    float32), and one set of random inputs (NHWC latents, timesteps, context)."""

    config: UNetConfig
    torch_unet: Any
    params: dict
    latents: np.ndarray
    timesteps: np.ndarray
    context: np.ndarray

    def ours_args(self, dtype: str) -> tuple:
        """(params, latents, timesteps, context) on the device in `dtype`: "bfloat16 on both sides" means the
        torch module holds bfloat16 weights, so ours gets them too."""
        dt = jnp.dtype(dtype)
        params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, dt), self.params))
        return params, jnp.asarray(self.latents, dt), jnp.asarray(self.timesteps), jnp.asarray(self.context, dt)

    def torch_args(self, torch_device, dtype: str) -> tuple:
        import torch

        from layerdiff_jax.bench import torch_reference as ref

        t_dtype = ref.TORCH_DTYPES[dtype]
        return (
            torch.from_numpy(self.latents).permute(0, 3, 1, 2).contiguous().to(torch_device, t_dtype),
            torch.from_numpy(self.timesteps).long().to(torch_device),
            torch.from_numpy(self.context).to(torch_device, t_dtype),
        )


def build_unet_pair(config: UNetConfig, batch: int, latent_size: int, context_length: int, seed: int = 0) -> UNetPair:
    from layerdiff_jax.bench import torch_reference as ref

    torch_unet = ref.build_unet(config, seed=seed)
    params = convert_state_dict(ref.numpy_state_dict(torch_unet), abstract_unet_params(UNet2DConditionModel(config)), rename)
    rng = np.random.default_rng(seed)
    return UNetPair(
        config, torch_unet, params,
        latents=rng.standard_normal((batch, latent_size, latent_size, config.in_channels)).astype(np.float32),
        timesteps=rng.integers(0, 1000, (batch,)).astype(np.int32),
        context=rng.standard_normal((batch, context_length, config.cross_attention_dim)).astype(np.float32),
    )


def unet_forward(config: UNetConfig, dtype: str, attention_impl: str) -> Callable:
    """forward(params, latents, timesteps, context) -> noise prediction, ours, to be jitted."""
    unet = UNet2DConditionModel(config, dtype=jnp.dtype(dtype), attention_impl=attention_impl)
    return lambda p, x, t, c: unet.apply({"params": p}, x, t, c)


def torch_unet_call(torch_unet, args: tuple, torch_device) -> Callable[[], Any]:
    """A blocking no-grad forward of the torch UNet on `args`."""
    import torch

    from layerdiff_jax.bench import torch_reference as ref

    def call():
        with torch.inference_mode():
            out = torch_unet(*args).sample
        ref.synchronize(torch_device)
        return out

    return call


def unet_loss_grad(config: UNetConfig, dtype: str, attention_impl: str) -> Callable:
    """grad(params, latents, timesteps, context) of the mean squared UNet output, ours, to be jitted: row 1b's
    forward+backward."""
    forward = unet_forward(config, dtype, attention_impl)
    return jax.grad(lambda p, x, t, c: jnp.mean(jnp.square(forward(p, x, t, c).astype(jnp.float32))))


def torch_unet_backward_call(torch_unet, args: tuple, torch_device) -> Callable[[], Any]:
    """A blocking forward+backward of the torch UNet on `args` (the same loss as `unet_loss_grad`)."""
    from layerdiff_jax.bench import torch_reference as ref

    def call():
        torch_unet.zero_grad(set_to_none=True)
        torch_unet(*args).sample.float().square().mean().backward()
        ref.synchronize(torch_device)

    return call


def nhwc_numpy(torch_out) -> np.ndarray:
    return torch_out.float().permute(0, 2, 3, 1).cpu().numpy()


def bench_unet(settings: BenchSettings) -> list[Row]:
    from layerdiff_jax.bench import torch_reference as ref

    b = settings.unet
    device = jax.devices()[0]
    torch_device = ref.torch_device(settings.device)
    pair = build_unet_pair(b.config, b.batch, b.latent_size, b.context_length)
    args = pair.ours_args(settings.dtype)
    torch_unet = ref.to_device(pair.torch_unet, torch_device, settings.dtype)
    targs = pair.torch_args(torch_device, settings.dtype)
    forward = unet_forward(b.config, settings.dtype, settings.attention_impl)
    torch_forward = torch_unet_call(torch_unet, targs, torch_device)

    size = b.latent_size
    shape = f"B={b.batch}, {size}x{size} latents, {b.context_length}x{b.config.cross_attention_dim} context, {settings.dtype}"
    rows = []
    for label, program, torch_call, row_id in (
        ("UNet forward", jax.jit(forward), torch_forward, "1a"),
        ("UNet forward+backward", jax.jit(unet_loss_grad(b.config, settings.dtype, settings.attention_impl)),
         torch_unet_backward_call(torch_unet, targs, torch_device), "1b"),
    ):
        compiled, compile_s = measure.compile_jitted(program, *args)
        ours_call = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
        _, memory = measure.timed(ours_call, 1)  # one call each for the memory columns
        _, torch_memory = measure.timed(torch_call, 1, torch_device=torch_device)
        # The timings: the two sides take turns, so this VM's drift between minutes slows both alike.
        load_before = measure.load_average()[0]
        timing, torch_timing = measure.time_interleaved([ours_call, torch_call], settings.repeats)
        load = measure.load_fields(load_before, measure.load_average()[0])
        timing.compile_s = compile_s
        ours = _row(
            row_id, f"{label} ({shape})", "ours", timing,
            xla_step_bytes=measure.compiled_memory_bytes(compiled), **measure.merged_fields(memory, load),
            **flops_fields(measure.matmul_flops(program, *args), timing.median, device, settings.peak_flops),
        )
        reference = _row(row_id, f"{label} ({shape})", "torch", torch_timing, **measure.merged_fields(torch_memory, load))
        rows += [_compare(ours, reference, higher_is_better=False, target=1.0, name="ours/torch time"), reference]
        if row_id == "1a" and settings.dtype == "float32":  # parity of the two forwards: same network, same weights
            ours.update(error_fields(np.asarray(ours_call()), nhwc_numpy(torch_call())))
    return rows


def error_fields(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Max abs error, and relative error ||got - reference|| / ||reference|| (L2 over all elements)."""
    got, reference = np.asarray(got, np.float64), np.asarray(reference, np.float64)
    diff = got - reference
    return {
        "max_abs_err": float(np.abs(diff).max()),
        "rel_err": float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30)),
    }


# ---------------------------------------------------------------------------------- SD components (2, 3)


@dataclasses.dataclass
class SDComponents:
    unet: tuple[UNet2DConditionModel, Any]
    vae: tuple[AutoencoderKL, Any]
    text_encoder: tuple[Any, Any]
    tokenizer: PromptTokenizer
    pipeline: Any  # the diffusers StableDiffusionPipeline holding the same weights (float32, CPU)


def build_sd(settings: BenchSettings, unet: UNetPair | None = None) -> SDComponents:
    """diffusers' StableDiffusionPipeline with random components (`unet`'s, if given), and ours with the same
    weights, converted in memory (float32 parameters; the modules compute in `settings.dtype`)."""
    from layerdiff_jax.bench import torch_reference as ref

    s = settings.sd
    if unet is not None and unet.config != s.unet:
        raise ValueError("build_sd: the UNet pair's config differs from settings.sd.unet")
    tokenizer = build_toy_tokenizer()
    configs = {"unet": s.unet, "vae": s.vae, "text_encoder": s.text_encoder}
    pipeline = ref.build_sd_pipeline(configs, tokenizer, seed=0, unet=None if unet is None else unet.torch_unet)
    dtype, impl = jnp.dtype(settings.dtype), settings.attention_impl
    modules = {
        "unet": UNet2DConditionModel(s.unet, dtype=dtype, attention_impl=impl),
        "vae": AutoencoderKL(s.vae, dtype=dtype, attention_impl=impl),
        "text_encoder": CLIPTextTransformer(s.text_encoder, dtype=dtype, attention_impl=impl),
    }
    abstract = {
        "unet": abstract_unet_params, "vae": abstract_vae_params, "text_encoder": abstract_text_encoder_params,
    }
    renames = {"unet": rename, "vae": rename_vae_key, "text_encoder": rename_text_encoder_key}
    loaded = {}
    for name, module in modules.items():
        if name == "unet" and unet is not None:
            params = unet.params
        else:
            torch_module = getattr(pipeline, name)
            params = convert_state_dict(ref.numpy_state_dict(torch_module), abstract[name](module), renames[name], source=name)
        loaded[name] = (module, jax.device_put(params))
    return SDComponents(loaded["unet"], loaded["vae"], loaded["text_encoder"], tokenizer, pipeline)


# ------------------------------------------------------------------------------------ row 2: DDIM t2i


def bench_ddim(settings: BenchSettings, sd: SDComponents, row: str = "2") -> list[Row]:
    import torch

    from layerdiff_jax.bench import torch_reference as ref

    s = settings.sd
    torch_device = ref.torch_device(settings.device)
    pipe = ref.to_device(sd.pipeline, torch_device, settings.dtype)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s.batch)]
    latent = s.image_size // s.vae.downsample_factor
    noise = np.random.default_rng(0).standard_normal((s.batch, latent, latent, s.vae.latent_channels)).astype(np.float32)
    dtype = jnp.dtype(settings.dtype)
    # The pipeline holds weights in the compute dtype, so ours does too (the modules compute in it either way).
    params = jax.tree.map(lambda p: p.astype(dtype), {"unet": sd.unet[1], "vae": sd.vae[1], "text_encoder": sd.text_encoder[1]})

    program = text_to_image_program(sd.unet[0], sd.vae[0], sd.text_encoder[0])
    schedule, timesteps, scale = make_schedule(), ddim_timesteps(s.steps), np.float32(GUIDANCE_SCALE)
    ids, uncond_ids = sd.tokenizer(prompts), sd.tokenizer([""] * len(prompts))
    compiled, compile_s = measure.compile_jitted(program, params, schedule, ids, uncond_ids, jnp.asarray(noise, dtype), timesteps, scale)

    def ours():  # prompts in, float images on the host out, like the pipeline call
        ids, uncond_ids = sd.tokenizer(prompts), sd.tokenizer([""] * len(prompts))
        return np.asarray(compiled(params, schedule, ids, uncond_ids, jnp.asarray(noise, dtype), timesteps, scale))

    torch_noise = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous().to(torch_device, ref.TORCH_DTYPES[settings.dtype])

    def diffusers_run():
        return pipe(
            prompts, height=s.image_size, width=s.image_size, num_inference_steps=s.steps, guidance_scale=GUIDANCE_SCALE,
            latents=torch_noise, output_type="np",
        ).images

    # First calls: the warm-up, and the images compared below.
    ours_images, torch_images = ours(), diffusers_run()
    timing, memory = measure.timed(ours, settings.repeats, warmup=0, compile_s=compile_s)
    torch_timing, torch_memory = measure.timed(diffusers_run, settings.repeats, warmup=0, torch_device=torch_device)
    name = f"DDIM {s.steps} steps + CFG {GUIDANCE_SCALE:g}, text-to-image (B={s.batch}, {s.image_size}x{s.image_size}, {settings.dtype})"
    ours_row = _row(row, name, "ours", timing, images_per_s=s.batch / timing.median,
                    xla_step_bytes=measure.compiled_memory_bytes(compiled), **memory)
    reference = _row(row, name, "diffusers", torch_timing, images_per_s=s.batch / torch_timing.median, **torch_memory)
    ours_row.update(error_fields(ours_images, torch_images))
    return [_compare(ours_row, reference, higher_is_better=True, target=DDIM_SPEEDUP_TARGET, name="images/s ours/diffusers"), reference]


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


@dataclasses.dataclass
class LayerTraining:
    """A LayerDiff train state initialised from the SD components, and what its train steps take besides a batch.
    Built once: the state's structure does not depend on remat or the batch, so every measured step shares it."""

    model: Any  # LayerDiffUNet
    sd: SDComponents
    config: Any  # the training config (ml_collections)
    tx: Any
    mesh: Any
    state_shardings: Any
    frozen_shardings: Any
    frozen: Any
    empty_context: jax.Array
    state: Any  # the latest state (steps donate it)

    def make_step(self, remat: bool):
        from layerdiff_jax.training.step import FrozenEncoders, layerdiff_micro_loss, make_train_step

        (_, _), (vae, _), (text_encoder, _) = self.sd.unet, self.sd.vae, self.sd.text_encoder
        micro_loss = layerdiff_micro_loss(self.model.clone(remat=remat), FrozenEncoders(vae, text_encoder), self.config)
        return make_train_step(micro_loss, self.tx, self.config, self.mesh, self.state_shardings, self.frozen_shardings)

    def batch(self, batch: int, num_layers: int, image_size: int, seed: int = 0) -> dict:
        from layerdiff_jax.mesh import global_batch

        local = _layer_batch(np.random.default_rng(seed), batch, num_layers, image_size, self.sd.tokenizer)
        return global_batch(local, self.mesh, sample_axis=1)

    def delete(self) -> None:
        """Frees the train state on the device (the frozen parameters may be the SD components' own arrays)."""
        for leaf in jax.tree.leaves(self.state):
            if isinstance(leaf, jax.Array):
                leaf.delete()


def layer_training(sd: SDComponents, *, dtype: str, attention_impl: str, max_layers: int, enhancer_heads: int) -> LayerTraining:
    """LayerDiff from the SD UNet (`init_from_sd`) with AdamW state, on a one-device mesh (grad_accum 1), built
    with the trainer's functions."""
    from layerdiff_jax.mesh import make_mesh, put_global
    from layerdiff_jax.training.config import base_config
    from layerdiff_jax.training.state import (
        abstract_boxed_state,
        abstract_state,
        frozen_param_shardings,
        make_optimizer,
        state_initializer,
    )

    device = jax.devices()[0]
    (unet, unet_params), (vae, vae_params), (text_encoder, text_params) = sd.unet, sd.vae, sd.text_encoder
    config = base_config()
    config.train.grad_accum_steps = 1
    config.model.compute_dtype = dtype
    config.model.attention_impl = attention_impl
    mesh = make_mesh((1, 1, 1), devices=[device])

    layer_config = LayerDiffConfig(max_layers=max_layers, enhancer_heads=enhancer_heads)
    model, params = init_from_sd(unet, unet_params, layer_config, jax.random.key(0))
    tx = make_optimizer(config.train)
    _, state_shardings = abstract_state(abstract_boxed_state(model, tx, ema=False), mesh)
    state = state_initializer(state_shardings, jax.random.key(1), tx=tx, ema=False)(put_global(params, state_shardings.params))
    del params
    factor = vae.config.downsample_factor
    frozen_shardings = frozen_param_shardings(
        {"vae": (vae, (jnp.zeros((1, factor, factor, 3)),)), "text_encoder": (text_encoder, (jnp.zeros((1, 77), jnp.int32),))}, mesh
    )
    frozen = put_global({"vae": vae_params, "text_encoder": text_params}, frozen_shardings)
    empty_context = jax.jit(text_encoder.apply)({"params": text_params}, sd.tokenizer([""]))[0]
    return LayerTraining(model, sd, config, tx, mesh, state_shardings, frozen_shardings, frozen, empty_context, state)


@dataclasses.dataclass
class CompiledStep:
    compiled: Any
    compile_s: float
    step: Callable  # the uncompiled step and the shapes of its arguments: what `flops` traces, if asked
    arg_shapes: tuple
    batch: dict
    samples: int

    @property
    def memory_bytes(self) -> int | None:
        return measure.compiled_memory_bytes(self.compiled)

    @functools.cached_property
    def flops(self) -> float | None:
        return measure.matmul_flops(self.step, *self.arg_shapes)


def compile_layer_step(training: LayerTraining, step, batch: dict) -> CompiledStep:
    """Lowers and compiles a train step for `batch` (the state's shapes do not change between steps)."""
    start = time.perf_counter()
    args = (training.state, batch, training.frozen, training.empty_context)
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - start
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args)
    return CompiledStep(compiled, seconds, step, shapes, batch, samples=batch["images"].shape[1])


def time_layer_step(training: LayerTraining, step: CompiledStep, repeats: int) -> tuple[measure.Timing, dict[str, Any]]:
    """Runs the compiled step `repeats` times after one warm-up, each blocking on the new state and metrics."""

    def call():
        training.state, metrics = step.compiled(training.state, step.batch, training.frozen, training.empty_context)
        jax.block_until_ready((training.state, metrics))

    return measure.timed(call, repeats, compile_s=step.compile_s)


def bench_layers(settings: BenchSettings, sd: SDComponents) -> list[Row]:
    b = settings.layers
    device = jax.devices()[0]
    training = layer_training(
        sd, dtype=settings.dtype, attention_impl=settings.attention_impl, max_layers=max(b.layer_counts),
        enhancer_heads=b.enhancer_heads,
    )
    step = training.make_step(b.remat)
    rows = []
    for num_layers in b.layer_counts:
        compiled = compile_layer_step(training, step, training.batch(b.batch, num_layers, b.image_size))
        timing, fields = time_layer_step(training, compiled, settings.repeats)
        # FLOPs of the whole step's matrix products and convolutions, the frozen encoders' included.
        flops = compiled.flops
        rows.append(_row(
            "3", f"LayerDiff train step, L={num_layers} (B={b.batch}, {b.image_size}x{b.image_size}, AdamW, {settings.dtype})",
            "ours", timing, layers=num_layers, samples_per_s=b.batch / timing.median,
            xla_step_bytes=compiled.memory_bytes, **fields, **flops_fields(flops, timing.median, device, settings.peak_flops),
        ))
    by_layers = {r["layers"]: r for r in rows}
    low = min(by_layers)
    for r in rows[1:]:
        r.update(ratio=r["median_s"] / by_layers[low]["median_s"], ratio_name=f"step time vs L={low}")
    if {2, 8} <= set(by_layers):  # the target: L = 8 at most 4.4x the step time of L = 2
        add_target(by_layers[8], "step time L=8 / L=2", by_layers[8]["ratio"], LAYER_TARGET_RATIO, at_least=False)
    return rows


# ------------------------------------------------------------------------------------------------ suite


ROWS = ("unet", "ddim", "layers")


def suite_environment(settings: BenchSettings) -> dict[str, Any]:
    """The machine and versions (`measure.environment`), torch's thread count and the instruction set its CPU kernels
    dispatch to (AVX2, AVX512; ATEN_CPU_CAPABILITY lowers it): on CPU, torch gets as many intra-op threads as XLA's
    CPU client uses cores, for a like-for-like comparison."""
    torch_threads = torch_isa = None
    if settings.device == "cpu":
        from layerdiff_jax.bench import torch_reference as ref

        torch_threads, torch_isa = ref.set_cpu_threads(), ref.cpu_capability()
    return {**measure.environment(), "torch_threads": torch_threads, "torch_cpu_capability": torch_isa}


@contextlib.contextmanager
def quick_compilation(quick: bool):
    """--quick only checks that every row runs: compile without XLA's expensive passes (about half the compile
    time on CPU), which makes its times meaningless."""
    were_disabled = bool(jax.config.read("jax_disable_most_optimizations"))
    jax.config.update("jax_disable_most_optimizations", quick or were_disabled)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", were_disabled)


def run_suite(settings: BenchSettings, rows: tuple[str, ...] = ROWS, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Every requested row, in this process; returns {"environment", "settings", "rows", "load_average"}. A row
    family that raises is recorded as a failed row (`failed_row`) and the others still run."""
    from layerdiff_jax.bench import torch_reference as ref

    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown benchmark row(s) {unknown}; choose from {ROWS}")
    ref.torch_device(settings.device)  # a torch without CUDA is a setting that cannot run here, not a failed row
    result: dict[str, Any] = {
        "suite": "standard",
        "environment": suite_environment(settings),
        "settings": settings.as_dict(),
        "load_average": {"start": measure.load_average()},
        "rows": [],
    }
    sd = functools.cache(lambda: build_sd(settings))  # rows 2 and 3 share it
    families = (
        ("unet", "1", "UNet forward / forward+backward, ours vs torch", lambda: bench_unet(settings)),
        ("ddim", "2", "DDIM text-to-image, ours vs diffusers", lambda: bench_ddim(settings, sd())),
        ("layers", "3", "LayerDiff train step over layer counts", lambda: bench_layers(settings, sd())),
    )
    with quick_compilation(settings.quick):
        for family, row_id, title, bench in families:
            if family not in rows:
                continue
            progress(f"row {row_id}: {title}")
            try:
                result["rows"] += bench()
            except Exception as error:  # noqa: BLE001 - one row family's failure must not cost the others
                log.exception("benchmark row %s failed", row_id)
                result["rows"].append(failed_row(row_id, title, "", error))
    result["load_average"]["end"] = measure.load_average()
    return result
