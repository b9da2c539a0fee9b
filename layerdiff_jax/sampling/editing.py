"""Single-layer editing without fine-tuning (the paper's applications: layer inpainting and style transfer), on generated or imported samples.

A sample (a `LayeredSample`, e.g. from `read_sample_folder`) is encoded with the VAE: every layer's
image, and its mask (the background's is `1 - sum of the foreground masks`, as in training) repeated to
3 channels. Then only the target layer is denoised; every other layer keeps its clean latent and is
shown to the model at timestep 1 (`ddim_sample(frozen=...)`), and its pixels are copied unchanged
into the result, so non-target layers stay bit-identical.

- Layer inpainting: the target starts from Gaussian noise with a new layer prompt; `steps` (100) DDIM steps.
- Layer style transfer: the target is noised to the first of the last `strength` x `steps` DDIM steps
  (0.25 x 100 = 25, like img2img) and denoised over them, with the style appended to its layer prompt.
Guidance uses the layer-aware negatives of the edited prompts.

The global prompt follows the edited layer prompt (`edited_global_prompt`): every layer attends to the global
prompt, so one that still names the old object draws it again (docs/experiments.md has the measurement).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from layerdiff_jax.data import synthetic
from layerdiff_jax.data.layers import LayeredSample, background_mask
from layerdiff_jax.diffusion.ddim import img2img_start
from layerdiff_jax.diffusion.guidance import PROMPT_JOINER
from layerdiff_jax.diffusion.settings import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH, check_prompt
from layerdiff_jax.sampling.sampler import LayerDiffPipeline, RequestError, to_uint8


def sample_arrays(sample: LayeredSample) -> tuple[np.ndarray, np.ndarray]:
    """images (L, H, W, 3) and masks (L, H, W) in [0, 1], layer 0 = background with the complement mask."""
    fg_masks = sample.masks.astype(np.float32) / 255.0
    images = np.concatenate([sample.background[None], sample.foregrounds]).astype(np.float32) / 255.0
    masks = np.concatenate([background_mask(fg_masks[..., None])[None, ..., 0], fg_masks])
    return images, masks


def edited_global_prompt(sample: LayeredSample, target: int, layer_prompt: str) -> tuple[str, str]:
    """The global prompt once layer `target`'s prompt becomes `layer_prompt`, and how it was obtained: "replaced"
    (the old layer prompt, found once in the global prompt as whole words, replaced by the new one) or "rebuilt"
    (composed from the layer prompts as the training data composes them)."""
    old = sample.layer_prompts[target].strip()
    phrase = re.compile(rf"(?<!\w){re.escape(old)}(?!\w)", re.IGNORECASE)
    # Found twice (two layers with one prompt), which occurrence names this layer is unknown: rebuilt.
    if old and len(phrase.findall(sample.global_prompt)) == 1:
        return phrase.sub(lambda _: layer_prompt, sample.global_prompt), "replaced"
    layer_prompts = [*sample.layer_prompts[:target], layer_prompt, *sample.layer_prompts[target + 1 :]]
    objects = [p for p in layer_prompts[1:] if p.strip()]
    return (synthetic.global_prompt(objects, layer_prompts[0]) if objects else layer_prompts[0]), "rebuilt"


def _check_edit(pipe: LayerDiffPipeline, sample: LayeredSample, target: int, **settings) -> None:
    """The settings (`check_sampling_settings`), the target layer and the sample's size; warns when the sample
    is not at the size the model was trained at."""
    pipe.check_settings(**settings)
    if not isinstance(target, (int, np.integer)) or not 0 <= target < sample.num_layers:
        raise RequestError(
            f"target layer {target!r} does not exist: the sample has layers 0 (background) to {sample.num_layers - 1}"
        )
    if sample.num_layers > pipe.max_layers:
        raise RequestError(f"the sample has {sample.num_layers} layers; the checkpoint supports at most {pipe.max_layers}")
    pipe.image_size(sample.size)


def _edit(
    pipe: LayerDiffPipeline,
    sample: LayeredSample,
    target: int,
    layer_prompts: list[str],
    given_global_prompt: str | None,
    *,
    seed: int,
    steps: int,
    strength: float | None,
    guidance: float,
    eta: float,
    record: dict,
) -> LayeredSample:
    """Re-generates layer `target` (from noise, or img2img at `strength`) with every other layer frozen; the global
    prompt is `given_global_prompt`, else follows the target's new prompt."""
    if given_global_prompt is None:
        global_prompt, obtained = edited_global_prompt(sample, target, layer_prompts[target])
    else:
        global_prompt, obtained = given_global_prompt, "given"
    n = sample.num_layers
    batch = pipe.pad_batch(1)  # a mesh needs one item per batch shard; the repeats are dropped
    images, masks = sample_arrays(sample)
    x0 = pipe.encode(np.repeat(images[None], batch, 0), np.repeat(masks[None], batch, 0))
    seeds = np.full((batch,), seed, np.uint32)
    noise = pipe.initial_noise(seeds, x0.shape[1:])
    frozen = np.repeat((np.arange(n) != target)[None], batch, 0)
    timesteps = pipe.timesteps_for(steps)
    if strength is None:
        x_start = jnp.where(frozen[..., None, None, None], x0, noise)
    else:
        timesteps, x_start = img2img_start(pipe.schedule, x0, noise, timesteps, strength, frozen=frozen)
    ids, valid = pipe.prompt_ids([global_prompt] * batch, [layer_prompts] * batch, n)
    latents = pipe.denoise(x_start, frozen, valid, ids, timesteps, seeds, guidance=guidance, eta=eta)
    new_images, new_masks = pipe.to_host(pipe.decode(latents[:, target : target + 1]))
    background, foregrounds, fg_masks = sample.background.copy(), sample.foregrounds.copy(), sample.masks.copy()
    if target == 0:  # the background's decoded mask is unused: the background fills the frame
        background = to_uint8(new_images[0, 0])
    else:
        foregrounds[target - 1] = to_uint8(new_images[0, 0])
        fg_masks[target - 1] = to_uint8(new_masks[0, 0])
    edit = {
        **record, "global_prompt_from": obtained, "previous_global_prompt": sample.global_prompt,
        "target_layer": target, "seed": seed, "steps": steps, "guidance": guidance, "eta": eta, "checkpoint": pipe.checkpoint,
    }
    metadata = {**sample.metadata, "edits": [*sample.metadata.get("edits", []), edit]}
    return LayeredSample(background, foregrounds, fg_masks, global_prompt, layer_prompts, metadata)


def inpaint_layer(
    pipe: LayerDiffPipeline,
    sample: LayeredSample,
    target: int,
    prompt: str,
    *,
    global_prompt: str | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    eta: float = 0.0,
) -> LayeredSample:
    """Layer inpainting: layer `target` (0 = background) re-generated from noise with layer prompt `prompt`;
    every other layer unchanged. The global prompt is `global_prompt` if given, else the sample's with the old
    layer prompt replaced by `prompt` (`edited_global_prompt`)."""
    _check_edit(pipe, sample, target, seed=seed, steps=steps, guidance=guidance, eta=eta)
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("inpainting needs a non-empty layer prompt for the target layer")
    check_prompt("prompt", prompt)
    if global_prompt is not None:
        check_prompt("global_prompt", global_prompt)
    layer_prompts = list(sample.layer_prompts)
    layer_prompts[target] = prompt
    record = {"edit": "inpaint", "previous_layer_prompt": sample.layer_prompts[target]}
    return _edit(
        pipe, sample, target, layer_prompts, global_prompt,
        seed=seed, steps=steps, strength=None, guidance=guidance, eta=eta, record=record,
    )


def restyle_layer(
    pipe: LayerDiffPipeline,
    sample: LayeredSample,
    target: int,
    style: str,
    *,
    strength: float = DEFAULT_STRENGTH,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    eta: float = 0.0,
) -> LayeredSample:
    """Layer style transfer: layer `target` noised to strength x steps DDIM steps and denoised with
    "<its prompt>, <style>"; every other layer unchanged. The global prompt carries the style too: the layer's
    denoising attends to it, and one that names the object unstyled pulls the layer back to its old look."""
    _check_edit(pipe, sample, target, seed=seed, steps=steps, guidance=guidance, eta=eta, strength=strength)
    if not isinstance(style, str) or not style.strip():
        raise RequestError("restyling needs a non-empty style text")
    check_prompt("style", style)
    layer_prompts = list(sample.layer_prompts)
    layer_prompts[target] = f"{layer_prompts[target]}{PROMPT_JOINER}{style}"
    record = {"edit": "restyle", "style": style, "strength": strength, "previous_layer_prompt": sample.layer_prompts[target]}
    return _edit(
        pipe, sample, target, layer_prompts, None,
        seed=seed, steps=steps, strength=strength, guidance=guidance, eta=eta, record=record,
    )
