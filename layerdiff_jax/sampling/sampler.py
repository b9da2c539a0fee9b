"""Text -> layers: LayerDiff's jitted DDIM sampler with layer-aware guidance, batched and mesh-sharded.

`LayerDiffPipeline` holds the LayerDiff UNet, the VAE, the CLIP text encoder (modules + params) and the
tokenizer. Its jitted functions take prompts as token ids, so new prompts reuse the compiled program:
one compilation per (batch, layers, latent size, steps, eta). With a `jax.sharding.Mesh` the batch axis
of every input and output is sharded over the mesh's "data"/"fsdp" axes and the params are replicated,
so a pod samples a long prompt list in data parallel (`jax.jit` with shardings; no pmap). On a pod each host can
take the samples its own devices drew (`iter_batches`, `SampledBatch.local`) instead of gathering every sample.

Requests in one run may have different layer counts: each is padded to the largest with invalid
layers (empty prompt, `layer_valid=False`), which the model never attends to and the sampler keeps
frozen, so a request's layers do not depend on the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layerdiff_jax.convert.clip_text import load_text_encoder
from layerdiff_jax.convert.core import ConversionError
from layerdiff_jax.convert.model_folder import SamplingSettings, load_layerdiff, load_sampling_settings, load_scheduler_config
from layerdiff_jax.convert.vae import load_vae
from layerdiff_jax.data.layers import LayeredSample
from layerdiff_jax.data.tokenizer import PromptTokenizer, load_tokenizer
from layerdiff_jax.diffusion.ddim import ddim_sample, ddim_timesteps
from layerdiff_jax.diffusion.guidance import BACKGROUND_NEGATIVE, guided_model_fn, layer_aware_negatives
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.diffusion.settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MAX_SAMPLES,
    MAX_SEED,
    RequestError,
    check_prompt,
    check_sampling_settings,
)
from layerdiff_jax.mesh import (
    BATCH_AXES, REPLICATED, batch_sharding, batch_size_divisor, batch_spec, gather_to_host, interleave_rows, local_rows,
)
from layerdiff_jax.models.clip_text import CLIPTextTransformer
from layerdiff_jax.models.layerdiff import LayerDiffUNet
from layerdiff_jax.models.vae import AutoencoderKL, encode_layers

DEFAULT_BACKGROUND_PROMPT = BACKGROUND_NEGATIVE  # the paper's p_0 = "the background" unless described
DEFAULT_IMAGE_SIZE = 256  # the paper's training resolution, when the checkpoint does not record one
_COMPONENTS = ("vae", "text_encoder", "tokenizer", "layerdiff")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A LayerDiff model folder that cannot be loaded; the message names the folder and the problem."""


@dataclasses.dataclass(frozen=True)
class LayerRequest:
    """One prompt set. `layer_prompts` are the FOREGROUND layers, deepest first; the background (layer 0)
    is described by `background_prompt`. The sample has `1 + len(layer_prompts)` layers."""

    prompt: str
    layer_prompts: tuple[str, ...]
    background_prompt: str = DEFAULT_BACKGROUND_PROMPT
    num_samples: int = 1
    seed: int | None = None  # sample i uses seed + i; None: the run's seed sequence

    def __post_init__(self):
        if isinstance(self.layer_prompts, str):
            raise RequestError(f"layer_prompts must be a list of strings, not the string {self.layer_prompts!r}")
        object.__setattr__(self, "layer_prompts", tuple(self.layer_prompts))
        for name in ("prompt", "background_prompt"):
            check_prompt(name, getattr(self, name))
        if not self.layer_prompts:
            raise RequestError(f"request {self.prompt!r} has no layer prompt: give at least one foreground layer prompt")
        if not all(isinstance(p, str) for p in self.layer_prompts):
            raise RequestError(f"layer prompts must be strings, got {list(self.layer_prompts)!r}")
        for i, p in enumerate(self.layer_prompts):
            check_prompt(f"layer_prompts[{i}]", p)
        check_sampling_settings(num_samples=self.num_samples, seed=self.seed)

    @property
    def all_layer_prompts(self) -> list[str]:
        """[background, foreground 1, ...]: the order of the exchange format's `layer_prompts`."""
        return [self.background_prompt, *self.layer_prompts]

    @property
    def num_layers(self) -> int:
        return 1 + len(self.layer_prompts)

    @classmethod
    def from_dict(cls, entry: Any, where: str = "request") -> "LayerRequest":
        """From a `--spec` JSON entry with the field names above (only `prompt` and `layer_prompts` required)."""
        if not isinstance(entry, Mapping):
            raise RequestError(f"{where}: expected an object with 'prompt' and 'layer_prompts', got {entry!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise RequestError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
        missing = [k for k in ("prompt", "layer_prompts") if k not in entry]
        if missing:
            raise RequestError(f"{where}: missing field(s) {missing}")
        if not isinstance(entry["layer_prompts"], list):
            raise RequestError(f"{where}: layer_prompts must be a list of strings, got {entry['layer_prompts']!r}")
        try:
            return cls(**entry)
        except RequestError as e:
            raise RequestError(f"{where}: {e}") from None


def read_request_file(path: str | Path) -> list[LayerRequest]:
    """A `--spec` file: a JSON list of request objects (or {"requests": [...]})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequestError(f"{path}: no such request file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"{path}: not valid JSON ({e})") from None
    entries = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise RequestError(f"{path}: expected a non-empty JSON list of requests (or {{\"requests\": [...]}})")
    return [LayerRequest.from_dict(e, f"{path} request {i}") for i, e in enumerate(entries)]


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """One sample to draw: the index of its request and the seed of this draw."""

    request_index: int
    seed: int


def expand_requests(requests: Sequence[LayerRequest], seed: int = 0) -> list[SampleJob]:
    """One job per sample. A request's own seed numbers its samples seed, seed+1, ...; the others take
    consecutive seeds from the run's `seed`, so a run is reproducible from its seed."""
    jobs, next_seed = [], seed
    for index, r in enumerate(requests):
        for i in range(r.num_samples):
            if r.seed is None:
                jobs.append(SampleJob(index, next_seed % (MAX_SEED + 1)))
                next_seed += 1
            else:
                jobs.append(SampleJob(index, (r.seed + i) % (MAX_SEED + 1)))
    return jobs


def to_unit(images: jax.Array) -> jax.Array:
    """VAE output in [-1, 1] -> [0, 1], clipped."""
    return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def available_bytes(device: jax.Device) -> int | None:
    """Memory `device` can still allocate: its allocator's limit less what is in use (GPU, TPU), or the host's
    MemAvailable for a CPU device, which allocates from host memory; None where neither is known."""
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):  # not Linux
            return None
    stats = device.memory_stats() or {}
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None


# Jitted programs, keyed by what they are built from (Flax modules compare by configuration) and the
# mesh: pipelines with the same architecture share compiled code, so re-loading a checkpoint (e.g. to
# evaluate several training steps) does not recompile.
_PROGRAMS: dict[tuple, Any] = {}
BATCH = batch_spec()  # an input split over the batch axes on its leading (sample) axis


def jit_program(build, *static, mesh: Mesh | None, inputs: tuple[PartitionSpec, ...], num_outputs: int = 1):
    """The jitted `build(*static)`, shared by every pipeline with the same `static` and mesh. `inputs` places each
    argument on `mesh` (`BATCH`: split over the batch axes, `REPLICATED`: params, schedule, timesteps...); every
    output is split over the batch axes."""
    key = (build.__name__, *static, mesh)
    if key not in _PROGRAMS:
        if mesh is None:
            _PROGRAMS[key] = jax.jit(build(*static))
        else:
            out = batch_sharding(mesh)
            _PROGRAMS[key] = jax.jit(
                build(*static),
                in_shardings=tuple(NamedSharding(mesh, spec) for spec in inputs),
                out_shardings=out if num_outputs == 1 else (out,) * num_outputs,
            )
    return _PROGRAMS[key]


def _noise_program(latent_shape: tuple[int, ...]):
    def run(seeds):
        return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), latent_shape))(seeds)

    return run


def _encode_prompts(text_encoder: CLIPTextTransformer, text_params, ids: jax.Array) -> tuple[dict, dict]:
    """ids (B, 2+2L, T) -> (cond, uncond) contexts {"global": (B, T, D), "layers": (B, L, T, D)}, one
    text-encoder call for all of them."""
    batch, rows, length = ids.shape
    num_layers = (rows - 2) // 2
    hidden = text_encoder.apply({"params": text_params}, ids.reshape(batch * rows, length)).reshape(batch, rows, length, -1)
    cond = {"global": hidden[:, 0], "layers": hidden[:, 1 : 1 + num_layers]}
    uncond = {"global": hidden[:, 1 + num_layers], "layers": hidden[:, 2 + num_layers :]}
    return cond, uncond


def _denoise_program(unet: LayerDiffUNet, text_encoder: CLIPTextTransformer, eta: float, prediction_type: str, guided: bool):
    """Guided DDIM; unguided (scale 1, where uncond + 1 * (cond - uncond) = cond) runs the conditional branch
    alone, half the model calls, as diffusers does."""

    def run(params, schedule, x_start, frozen, layer_valid, ids, seeds, timesteps, scale):
        cond, uncond = _encode_prompts(text_encoder, params["text"], ids)
        cond["valid"] = uncond["valid"] = layer_valid

        def apply_fn(x, t, c):
            return unet.apply({"params": params["unet"]}, x, t, c["global"], c["layers"], c["valid"])

        rng = jax.random.fold_in(jax.random.key(seeds[0]), 1) if eta != 0 else None
        model_fn = guided_model_fn(apply_fn, cond, uncond, scale) if guided else functools.partial(apply_fn, c=cond)
        return ddim_sample(model_fn, x_start, timesteps, schedule, eta=eta, rng=rng, frozen=frozen, prediction_type=prediction_type)

    return run


def _decode_program(vae: AutoencoderKL):
    def decode_layer(params, latents):  # (B, h, w, 8): one layer of every sample, its image and its mask together
        pairs = interleave_rows(*jnp.split(latents, 2, axis=-1))
        decoded = to_unit(vae.apply({"params": params["vae"]}, pairs, method=AutoencoderKL.decode_latents))
        decoded = decoded.reshape(latents.shape[0], 2, *decoded.shape[1:])
        return decoded[:, 0], decoded[:, 1].mean(-1)

    def run(params, latents):
        # One layer at a time (the layer axis is never sharded): at 512x512 the VAE decoder's activations for every
        # layer of a batch at once outgrow the denoise program's, and would cap the batch a chip can sample.
        images, masks = jax.lax.map(lambda x: decode_layer(params, x), jnp.moveaxis(latents, 1, 0))
        return jnp.moveaxis(images, 0, 1), jnp.moveaxis(masks, 0, 1)

    return run


def denoise_program(
    unet: LayerDiffUNet, text_encoder: CLIPTextTransformer, eta: float, prediction_type: str, guided: bool, mesh: Mesh | None
):
    """The jitted denoise program (`_denoise_program`) as pipelines run it on `mesh`."""
    return jit_program(
        _denoise_program, unet, text_encoder, float(eta), prediction_type, guided, mesh=mesh,
        # params, schedule | x_start, frozen, layer_valid, ids, seeds | timesteps, scale
        inputs=(REPLICATED, REPLICATED, BATCH, BATCH, BATCH, BATCH, BATCH, REPLICATED, REPLICATED),
    )


def denoise_arguments(params, schedule, batch: int, latent_shape: tuple[int, ...], num_tokens: int, steps: int) -> tuple:
    """The denoise program's arguments for `batch` samples of `latent_shape` (L, h, w, 8), prompts of `num_tokens`
    tokens and `steps` steps, as `LayerDiffPipeline.denoise` passes them (the latents as ShapeDtypeStructs):
    params, schedule, x_start, frozen, layer_valid, ids, seeds, timesteps, scale."""
    num_layers = latent_shape[0]

    def rows(*shape, dtype):
        return jax.ShapeDtypeStruct((batch, *shape), dtype)

    return (
        params, schedule, rows(*latent_shape, dtype=jnp.float32), rows(num_layers, dtype=bool), rows(num_layers, dtype=bool),
        rows(2 + 2 * num_layers, num_tokens, dtype=np.int32), rows(dtype=np.uint32),
        jax.ShapeDtypeStruct((steps,), np.int32), jax.ShapeDtypeStruct((), np.float32),
    )


def decode_program(vae: AutoencoderKL, mesh: Mesh | None):
    """The jitted decode program (`_decode_program`) as pipelines run it on `mesh`: (params, latents) -> (images, masks)."""
    return jit_program(_decode_program, vae, mesh=mesh, inputs=(REPLICATED, BATCH), num_outputs=2)


def _encode_program(vae: AutoencoderKL):
    def run(params, images, masks):
        return encode_layers(vae, params["vae"], images * 2.0 - 1.0, masks[..., None])

    return run


class LayerDiffPipeline:
    """LayerDiff UNet + VAE + CLIP text encoder + tokenizer, with jitted sample / decode / encode.

    Latents are (B, L, h, w, 8): image latent ++ mask latent, in diffusion units (VAE scaling applied).
    """

    def __init__(
        self,
        unet: LayerDiffUNet,
        unet_params: Any,
        vae: AutoencoderKL,
        vae_params: Any,
        text_encoder: CLIPTextTransformer,
        text_params: Any,
        tokenizer: PromptTokenizer,
        *,
        scheduler: SchedulerConfig = SchedulerConfig(),
        sampling: SamplingSettings = SamplingSettings(),
        checkpoint: str = "",
        mesh: Mesh | None = None,
    ):
        if tokenizer.max_length > text_encoder.config.max_position_embeddings:
            raise CheckpointError(
                f"{checkpoint or 'pipeline'}: tokenizer max_length {tokenizer.max_length} exceeds the text encoder's "
                f"{text_encoder.config.max_position_embeddings} positions"
            )
        if text_encoder.config.hidden_size != unet.unet_config.cross_attention_dim:
            raise CheckpointError(
                f"{checkpoint or 'pipeline'}: text encoder width {text_encoder.config.hidden_size} != the UNet's "
                f"cross_attention_dim {unet.unet_config.cross_attention_dim}"
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler  # the schedule and prediction type the UNet was trained with
        self.sampling = sampling  # the steps and guidance the tools default to: the model folder's, else the paper's
        self.schedule = scheduler.make_schedule()
        self.checkpoint = checkpoint
        self.mesh = mesh
        if mesh is not None and not set(BATCH_AXES) <= set(mesh.axis_names):
            raise ValueError(f"mesh axes {mesh.axis_names} lack the batch axes {BATCH_AXES}")
        self.batch_shards = 1 if mesh is None else batch_size_divisor(mesh)
        params = {"unet": unet_params, "vae": vae_params, "text": text_params}
        self.params = jax.device_put(params) if mesh is None else jax.device_put(params, NamedSharding(mesh, REPLICATED))
        self._executables: dict[tuple, Any] = {}  # see `_executable`

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, folder: str | Path, *, mesh: Mesh | None = None, dtype: Any = jnp.float32, attention_impl: str = "auto"
    ) -> "LayerDiffPipeline":
        """From a LayerDiff model folder (`vae/`, `text_encoder/`, `tokenizer/`, `layerdiff/`).
        Any problem raises `CheckpointError` naming the folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint {folder}: not a folder")
        missing = [c for c in _COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise CheckpointError(
                f"checkpoint {folder}: missing {', '.join(f'{c}/' for c in missing)} (a LayerDiff model folder has "
                f"{', '.join(f'{c}/' for c in _COMPONENTS)})"
            )
        try:
            unet, unet_params = load_layerdiff(folder, dtype=dtype, attention_impl=attention_impl)
            vae, vae_params = load_vae(folder / "vae", dtype=dtype, attention_impl=attention_impl)
            text, text_params = load_text_encoder(folder / "text_encoder", dtype=dtype, attention_impl=attention_impl)
            tokenizer = load_tokenizer(folder / "tokenizer", max_length=text.config.max_position_embeddings)
            scheduler = load_scheduler_config(folder)
            sampling = load_sampling_settings(folder, scheduler.num_train_timesteps)
        except (ConversionError, FileNotFoundError, OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {folder}: cannot be loaded: {type(e).__name__}: {e}") from None
        return cls(
            unet, unet_params, vae, vae_params, text, text_params, tokenizer,
            scheduler=scheduler, sampling=sampling, checkpoint=str(folder), mesh=mesh,
        )

    # ------------------------------------------------------------------ geometry

    @property
    def max_layers(self) -> int:
        return self.unet.config.max_layers

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae_factor * 2 ** (len(self.unet.unet_config.block_out_channels) - 1)

    @property
    def trained_size(self) -> tuple[int, int] | None:
        """(H, W): the training resolution the model folder records (UNet `sample_size` x VAE factor), or None."""
        s = self.unet.unet_config.sample_size
        if s is None:
            return None
        h, w = (s, s) if isinstance(s, int) else s
        return h * self.vae_factor, w * self.vae_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """(H, W): the recorded training size, else 256x256."""
        return self.trained_size or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)

    def image_size(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """`size` (default: `default_size`), checked; warns when it is not the size the model was trained at,
        or when the model does not say and the default is taken, since other sizes give much worse samples."""
        where = self.checkpoint or "the model"
        trained = self.trained_size
        if size is None:
            size = self.default_size
            if trained is None:
                log.warning(
                    "%s does not record its training resolution: sampling at %dx%d; give the size it was trained at "
                    "if it differs (a model folder exported by this version's training records it)", where, *size,
                )
        elif trained is not None and tuple(size) != trained:
            log.warning("sampling at %dx%d, but %s was trained at %dx%d: expect much worse samples", *size, where, *trained)
        return self.check_size(tuple(size))

    def check_size(self, size: tuple[int, int]) -> tuple[int, int]:
        check_sampling_settings(size=size)
        h, w = size
        m = self.size_multiple
        if h < m or w < m or h % m or w % m:
            raise RequestError(f"image size {h}x{w}: both sides must be positive multiples of {m} for this checkpoint")
        return h, w

    def check_settings(self, **settings) -> None:
        """`check_sampling_settings` with this model's number of training timesteps."""
        check_sampling_settings(num_train_timesteps=self.schedule.num_train_timesteps, **settings)

    def timesteps_for(self, steps: int) -> np.ndarray:
        """The DDIM timesteps of a `steps`-step schedule."""
        self.check_settings(steps=steps)
        return ddim_timesteps(steps, self.schedule.num_train_timesteps)

    def latent_shape(self, num_layers: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        h, w = self.check_size(size)
        return num_layers, h // self.vae_factor, w // self.vae_factor, 2 * self.vae.config.latent_channels

    def check_requests(self, requests: Sequence[LayerRequest]) -> None:
        if not requests:
            raise RequestError("no request to sample")
        total = sum(r.num_samples for r in requests)
        if total > MAX_SAMPLES:
            raise RequestError(
                f"the {len(requests)} requests ask for {total} samples, a run draws at most {MAX_SAMPLES}: split it into runs"
            )
        for r in requests:
            if r.num_layers > self.max_layers:
                raise RequestError(
                    f"request {r.prompt!r} asks for {r.num_layers} layers (background + {r.num_layers - 1}); "
                    f"checkpoint {self.checkpoint or '(in memory)'} supports at most max_layers={self.max_layers}"
                )

    # ------------------------------------------------------------------ device placement

    def batch_to_device(self, x: Any) -> Any:
        """Host arrays (batch-leading) -> device arrays, sharded over the mesh's batch axes when there is one."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, x)
        for a in jax.tree.leaves(x):
            if a.shape[0] % self.batch_shards:
                raise RequestError(f"batch of {a.shape[0]} does not split over the mesh's {self.batch_shards} batch shards; see pad_batch")
        return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(self.mesh)), x)

    def on_batch_shards(self, x: jax.Array) -> jax.Array:
        """A device array laid out as the jitted functions expect (a no-op without a mesh)."""
        return x if self.mesh is None else jax.device_put(x, batch_sharding(self.mesh))

    def to_host(self, x: Any) -> Any:
        """Device arrays -> numpy on every process (all-gathers batch shards held by other hosts)."""
        return gather_to_host(x)

    def pad_batch(self, size: int) -> int:
        """The batch size to run for `size` items: a multiple of the number of batch shards."""
        return -(-size // self.batch_shards) * self.batch_shards

    def _program(self, build, *static, inputs: tuple[PartitionSpec, ...], num_outputs: int = 1):
        """`jit_program` on this pipeline's mesh."""
        return jit_program(build, *static, mesh=self.mesh, inputs=inputs, num_outputs=num_outputs)

    def _executable(self, program, args: tuple, latents_shape: tuple[int, ...]):
        """`program` (from `_program`) compiled ahead of time for `args` (arrays or ShapeDtypeStructs, the params
        first), once per argument shape on this pipeline; JAX's cache shares the compilation itself with other
        pipelines of the same model. Before it is first returned, `_check_memory` refuses a program that cannot fit,
        so that a batch too large fails with a RequestError before it runs, not in the allocator."""
        key = (program, *((a.shape, a.dtype) for a in jax.tree.leaves(args[1:])))
        if key not in self._executables:
            compiled = program.lower(*args).compile()
            self._check_memory(compiled, latents_shape)
            self._executables[key] = compiled
        return self._executables[key]

    def _check_memory(self, compiled, latents_shape: tuple[int, ...]) -> None:
        """RequestError if a call of `compiled`, on latents of `latents_shape` (B, L, h, w, 8), needs more memory than
        its device has available. The need is what the call allocates as XLA's buffer assignment plans it, its
        outputs and temporaries; its arguments are not counted: the params are in memory already (and a
        program's unused params are not even its arguments), the batch's inputs are small next to the
        temporaries. It is per device; CPU devices all allocate from the host's memory."""
        analysis = compiled.memory_analysis()
        devices = [jax.devices()[0]] if self.mesh is None else self.mesh.local_devices
        available = available_bytes(devices[0])
        if analysis is None or available is None:  # a backend that does not say: the allocator will
            return
        need = analysis.output_size_in_bytes + analysis.temp_size_in_bytes
        need *= len(devices) if devices[0].platform == "cpu" else 1
        if need > available:
            batch, layers, h, w, _ = latents_shape
            raise RequestError(
                f"batch {batch} at {h * self.vae_factor}x{w * self.vae_factor} with {layers} layers needs "
                f"~{need / 2**30:.3g} GiB, the device has {available / 2**30:.3g} GiB available; use a smaller --batch-size or --size"
            )

    def check_batch_fits(
        self, batch: int, latent_shape: tuple[int, ...], num_tokens: int, steps: int, *, guidance: float, eta: float
    ) -> None:
        """Compiles the denoise and decode programs for batches of `batch` samples of `latent_shape` (L, h, w, 8),
        prompts of `num_tokens` tokens and `steps` steps, as `iter_batches` runs them, and refuses them if they
        cannot fit (`_executable`) before any of their inputs is made: the run's first batch then reuses them."""
        denoise_args = denoise_arguments(self.params, self.schedule, batch, latent_shape, num_tokens, steps)
        latents = denoise_args[2]  # the noise's and the denoised latents' type
        self._executable(self._denoiser(guidance, eta), denoise_args, latents.shape)
        self._executable(self._decoder(), (self.params, latents), latents.shape)

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, prompts: Sequence[str], layer_prompts: Sequence[Sequence[str]], num_layers: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the conditional and layer-aware negative prompts, and the layer validity.

        Returns `ids` int32 (B, 2 + 2L, T) = [global, L layer prompts, negative global, L negative layer
        prompts] (padding layers get the empty prompt) and `layer_valid` bool (B, L). Prompts longer than
        the tokenizer's limit are truncated with a logged warning.
        """
        texts, valid = [], np.zeros((len(prompts), num_layers), bool)
        for b, (prompt, layers) in enumerate(zip(prompts, layer_prompts, strict=True)):
            if len(layers) > num_layers:
                raise RequestError(f"{len(layers)} layer prompts do not fit in {num_layers} layers")
            pad = [""] * (num_layers - len(layers))
            neg_global, neg_layers = layer_aware_negatives(list(layers))
            texts += [prompt, *layers, *pad, neg_global, *neg_layers, *pad]
            valid[b, : len(layers)] = True
        ids = self.tokenizer(texts).reshape(len(prompts), 2 + 2 * num_layers, -1)
        return ids, valid

    # ------------------------------------------------------------------ jitted building blocks

    def initial_noise(self, seeds: np.ndarray, latent_shape: tuple[int, ...]) -> jax.Array:
        """Standard normal latents (B, *latent_shape), sample b drawn from `jax.random.key(seeds[b])` alone,
        so a sample does not depend on its batch neighbours or on the mesh."""
        fn = self._program(_noise_program, tuple(latent_shape), inputs=(BATCH,))
        return fn(self.batch_to_device(np.asarray(seeds, np.uint32)))

    def denoise(
        self,
        x_start: jax.Array,
        frozen: np.ndarray,
        layer_valid: np.ndarray,
        ids: np.ndarray,
        timesteps: np.ndarray,
        seeds: np.ndarray,
        *,
        guidance: float = DEFAULT_GUIDANCE,
        eta: float = 0.0,
    ) -> jax.Array:
        """Guided DDIM from `x_start` (B, L, h, w, 8) over `timesteps`, as one jitted `lax.scan`.

        `frozen` (B, L) layers keep their `x_start` latent and see timestep 1 (padding, and the
        non-target layers of an edit). `ids`/`layer_valid` come from `prompt_ids`. With eta > 0 the
        per-step noise comes from the first sample's seed (so it depends on the batch).
        Timestep values, prompts and the guidance scale are traced: changing them does not recompile (except
        to or from guidance 1, which skips the negative-prompt branch).
        """
        batch = self.batch_to_device(
            (np.asarray(frozen, bool), np.asarray(layer_valid, bool), np.asarray(ids, np.int32), np.asarray(seeds, np.uint32))
        )
        args = (self.params, self.schedule, self.on_batch_shards(x_start), *batch, np.asarray(timesteps, np.int32), np.float32(guidance))
        return self._executable(self._denoiser(guidance, eta), args, x_start.shape)(*args)

    def _denoiser(self, guidance: float, eta: float):
        """The jitted denoise program; guidance 1 runs the conditional branch alone."""
        return denoise_program(self.unet, self.text_encoder, eta, self.scheduler.prediction_type, float(guidance) != 1.0, self.mesh)

    def decode(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Latents (B, L, h, w, 8) -> images (B, L, H, W, 3) and masks (B, L, H, W), both in [0, 1].

        mask = mean of the 3 decoded mask channels, mapped from [-1, 1] to [0, 1] (as the paper samples).
        """
        args = (self.params, self.on_batch_shards(latents))
        return self._executable(self._decoder(), args, latents.shape)(*args)

    def _decoder(self):
        """The jitted decode program."""
        return decode_program(self.vae, self.mesh)

    def encode(self, images: np.ndarray, masks: np.ndarray) -> jax.Array:
        """images (B, L, H, W, 3) and masks (B, L, H, W), both in [0, 1] -> latents (B, L, h, w, 8).

        Posterior means; each mask is repeated to 3 channels and mapped to [-1, 1], as in training.
        """
        fn = self._program(_encode_program, self.vae, inputs=(REPLICATED, BATCH, BATCH))
        return fn(self.params, *self.batch_to_device((np.asarray(images, np.float32), np.asarray(masks, np.float32))))

    # ------------------------------------------------------------------ text -> layers

    def generate(self, requests: Sequence[LayerRequest], **settings) -> list[LayeredSample]:
        """Every sample of every request, in request order (`iter_generate`, collected)."""
        return list(self.iter_generate(requests, **settings))

    def iter_generate(self, requests: Sequence[LayerRequest], **settings) -> Iterator[LayeredSample]:
        """Every sample of every request, in request order, on every process, yielded as each batch finishes so that
        a caller can write them before the next batch runs (`iter_batches`, each gathered)."""
        for batch in self.iter_batches(requests, **settings):
            yield from batch.gather()

    def iter_batches(
        self,
        requests: Sequence[LayerRequest],
        *,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        size: tuple[int, int] | None = None,
        progress: bool = True,
    ) -> Iterator["SampledBatch"]:
        """Draws every sample of every request (in request order), yielding each batch as it finishes, still on the
        devices (`SampledBatch`). On several processes every one must take every batch: each is one computation.

        Batches of `batch_size` (default: one per batch shard; at most the run's samples, since a larger batch
        would only compute repeats; rounded up to a multiple of the shards) share one compiled program: all run
        at the largest layer count in `requests`, and the last batch is filled with repeats that are then
        dropped. `size` defaults to the training resolution the model records. `metadata` records the sampling
        settings. Settings are checked before anything runs, and so is memory: a batch that XLA's plan says
        cannot fit in the device's available memory is refused with RequestError (`check_batch_fits`).
        """
        self.check_requests(requests)
        self.check_settings(steps=steps, guidance=guidance, eta=eta, seed=seed, batch_size=batch_size)
        size = self.image_size(size)
        timesteps = self.timesteps_for(steps)
        jobs = expand_requests(requests, seed)
        batch = self.pad_batch(min(batch_size or 1, len(jobs)))
        num_layers = max(r.num_layers for r in requests)
        latent_shape = self.latent_shape(num_layers, size)
        # Tokenized once per request (a truncated prompt warns once), then gathered per batch.
        ids, valid = self.prompt_ids([r.prompt for r in requests], [r.all_layer_prompts for r in requests], num_layers)
        self.check_batch_fits(batch, latent_shape, ids.shape[-1], len(timesteps), guidance=guidance, eta=eta)
        settings = {"steps": steps, "guidance": guidance, "eta": eta, "checkpoint": self.checkpoint}
        for start in tqdm.tqdm(range(0, len(jobs), batch), desc="sampling", unit="batch", disable=not progress):
            chunk = jobs[start : start + batch]
            filled = chunk + [chunk[-1]] * (batch - len(chunk))
            rows = np.array([j.request_index for j in filled])
            seeds = np.array([j.seed for j in filled], np.uint32)
            x_T = self.initial_noise(seeds, latent_shape)
            latents = self.denoise(x_T, ~valid[rows], valid[rows], ids[rows], timesteps, seeds, guidance=guidance, eta=eta)
            described = [(requests[j.request_index], {"seed": j.seed, **settings}) for j in chunk]
            yield SampledBatch(start, described, *self.decode(latents))


@dataclasses.dataclass(frozen=True)
class SampledBatch:
    """One batch of a run, decoded and still on the devices: `images` (B, L, H, W, 3) and `masks` (B, L, H, W), split
    over the batch axes. Its rows are the run's samples `start`, `start` + 1, ... (one per entry of `described`: the
    request and the metadata), then repeats that only fill the batch."""

    start: int
    described: list[tuple[LayerRequest, dict]]
    images: jax.Array
    masks: jax.Array

    def gather(self, count: int | None = None) -> list[LayeredSample]:
        """The batch's first `count` samples (default: all), on every process: all-gathered from the processes that
        hold them. On several processes every one must call it alike."""
        n = len(self.described) if count is None else min(count, len(self.described))
        images, masks = gather_to_host((self.images[:n], self.masks[:n]))
        return [self._sample(b, images[b], masks[b]) for b in range(n)]

    def local(self) -> list[tuple[int, LayeredSample]]:
        """(index in the run, sample) for the samples this process's devices hold, read without communication, in
        order: over all processes every sample of the batch comes exactly once (`mesh.local_rows`)."""
        images, masks = local_rows(self.images), local_rows(self.masks)
        return [(self.start + b, self._sample(b, images[b], masks[b])) for b in sorted(images) if b < len(self.described)]

    def _sample(self, b: int, images: np.ndarray, masks: np.ndarray) -> LayeredSample:
        request, metadata = self.described[b]
        return layered_sample(images, masks, request.prompt, request.all_layer_prompts, metadata)


def layered_sample(images: np.ndarray, masks: np.ndarray, prompt: str, layer_prompts: Sequence[str], metadata: dict) -> LayeredSample:
    """Decoded layers (L, H, W, 3) / masks (L, H, W) in [0, 1] -> a LayeredSample of `len(layer_prompts)`
    layers. The background's decoded mask is dropped: the background is the full frame under the others."""
    n = len(layer_prompts)
    return LayeredSample(
        background=to_uint8(images[0]),
        foregrounds=to_uint8(images[1:n]),
        masks=to_uint8(masks[1:n]),
        global_prompt=prompt,
        layer_prompts=list(layer_prompts),
        metadata=dict(metadata),
    )
