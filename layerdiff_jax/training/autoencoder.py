"""Fitting a (toy) VAE to layered data, and choosing its latent scaling factor.

SD-1.5's VAE comes pre-trained; the toy SD of the CPU demo does not, so the demo fits one first on the
images LayerDiff will encode: backgrounds, foreground layers (black outside their masks) and the masks
themselves as 3-channel images, plus the composites (dense colour), all in [-1, 1]. The loss is L1 (sharp
mask edges, as in LDM's autoencoders) plus MSE (which pulls hardest on large colour errors: with L1 alone
small shapes came back in the wrong hue) plus a small KL term. Crops are drawn preferring ones with
content, since most of a foreground layer is black. The scaling factor is then set, like SD's 0.18215, so
that scaled latents have unit standard deviation.

With L1 alone on uniform crops of layers and masks, encoded-and-decoded layers lost their colours; with this
loss and these crops they keep colour, shape and background (docs/experiments.md).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from layerdiff_jax.data.layers import LayeredSample, background_mask
from layerdiff_jax.data.loader import single_object_view
from layerdiff_jax.data.synthetic import PALETTE, generate_sample, parse_foreground_prompt
from layerdiff_jax.data.tokenizer import build_toy_tokenizer
from layerdiff_jax.models.init import init_params
from layerdiff_jax.models.vae import AutoencoderKL
from layerdiff_jax.toy import toy_configs

NEAR_BLACK = 60  # uint8 level: a pixel whose brightest channel is at most this is "black" (no content)


def layer_images(sample: LayeredSample) -> np.ndarray:
    """Every image of a sample the VAE will see, uint8 (N, H, W, 3): layers, then masks (background's first)."""
    masks = sample.masks.astype(np.float32) / 255.0
    all_masks = np.concatenate([background_mask(masks[..., None])[None], masks[..., None]], axis=0)
    mask_images = np.repeat(np.round(all_masks * 255.0).astype(np.uint8), 3, axis=-1)
    return np.concatenate([sample.background[None], sample.foregrounds, mask_images], axis=0)


def to_model_range(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class VAEFitConfig:
    steps: int = 1500
    batch_size: int = 32
    crop: int = 32  # random square crops: the VAE is convolutional, and small crops are 4x cheaper than 64x64
    min_content: float = 0.05  # a crop "has content" when this share of its pixels is not near-black
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    # Train the decoder only (and post_quant_conv), as SD's VAE decoder was fine-tuned after its release: the
    # encoder, and so the latent space a UNet was trained in, stays exactly as it was.
    decoder_only: bool = False
    # Gaussian noise added to the posterior mean before decoding, its std drawn per image from U(0, this) in
    # units of the latent's overall std: a decoder that has seen the neighbourhood of the data's latents also
    # decodes a diffusion model's imperfect ones (speckle-free masks), and still sees exact means as well.
    latent_noise: float = 0.0


DECODER_PARTS = ("decoder", "post_quant_conv")


def fit_vae(vae: AutoencoderKL, params, images: np.ndarray, config: VAEFitConfig, *, progress: bool = True):
    """Trains `params` on uint8 `images` (N, H, W, 3); returns (params, per-step L1 losses)."""
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.05)
    tx = optax.adam(schedule)
    if config.decoder_only:
        labels = {name: jax.tree.map(lambda _: name in DECODER_PARTS, part) for name, part in params.items()}
        tx = optax.multi_transform({True: tx, False: optax.set_to_zero()}, labels)
    opt_state = tx.init(params)

    def loss_fn(p, batch, key):
        mean, logvar = vae.apply({"params": p}, batch, method=vae.encode)
        if config.decoder_only:  # no gradient through the frozen encoder
            mean, logvar = jax.lax.stop_gradient((mean, logvar))
        # Decoding the posterior mean, not a sample: with a tiny KL weight the posterior noise (std 1 at init)
        # would drown the latent's signal for thousands of steps, far past a CPU demo's budget.
        z = mean
        if config.latent_noise:
            level_key, noise_key = jax.random.split(key)
            level = config.latent_noise * jax.random.uniform(level_key, (mean.shape[0], 1, 1, 1))
            z = mean + level * jnp.std(mean) * jax.random.normal(noise_key, mean.shape)
        error = vae.apply({"params": p}, z, method=vae.decode) - batch
        l1 = jnp.mean(jnp.abs(error))
        kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        return l1 + jnp.mean(error**2) + config.kl_weight * kl, l1

    @jax.jit
    def step(p, opt_state, batch, key):
        (_, l1), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, l1

    rng = np.random.default_rng(config.seed)
    keys = jax.random.split(jax.random.key(config.seed), config.steps)
    losses = []
    bar = tqdm(range(config.steps), desc="fit VAE", disable=not progress)
    for i in bar:
        batch = to_model_range(content_crops(images, config.batch_size, config.crop, config.min_content, rng))
        params, opt_state, l1 = step(params, opt_state, batch, keys[i])
        if i % 25 == 0 or i == config.steps - 1:
            losses.append((i, float(l1)))
            bar.set_postfix(l1=f"{losses[-1][1]:.4f}")
    return params, losses


def content_crops(images: np.ndarray, count: int, size: int, min_content: float, rng: np.random.Generator) -> np.ndarray:
    """`count` random crops of `images`, drawn from 4x as many candidates: those with content (at least
    `min_content` of their pixels not near-black) 10x as likely as the rest, so empty crops still occur."""
    candidates = _random_crops(images, 4 * count, size, rng)
    has_content = (candidates.max(axis=-1) > NEAR_BLACK).mean(axis=(1, 2)) >= min_content
    weights = np.where(has_content, 1.0, 0.1)
    return candidates[rng.choice(len(candidates), count, replace=False, p=weights / weights.sum())]


def _random_crops(images: np.ndarray, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    picks = rng.integers(0, len(images), count)
    size = min(size, images.shape[1], images.shape[2])
    tops = rng.integers(0, images.shape[1] - size + 1, count)
    lefts = rng.integers(0, images.shape[2] - size + 1, count)
    return np.stack([images[i, t : t + size, l : l + size] for i, t, l in zip(picks, tops, lefts)])


def latent_scaling_factor(vae: AutoencoderKL, params, images: np.ndarray, batch_size: int = 64) -> float:
    """1 / std of the posterior means over `images`: the factor that makes scaled latents unit-variance."""
    encode = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode_mean))
    means = np.concatenate([np.asarray(encode(to_model_range(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)])
    return float(1.0 / means.std())


def collect_images(samples: Iterable[LayeredSample]) -> np.ndarray:
    """The layer images of every sample, then their composites."""
    samples = list(samples)
    return np.concatenate([layer_images(s) for s in samples] + [np.stack([s.composite() for s in samples])], axis=0)


def single_object_images(samples: Iterable[LayeredSample], seed: int) -> np.ndarray:
    """One foreground of each sample with foregrounds, alone on a plain background of another palette colour:
    the flat view a text-to-image base draws for "a red circle on a blue background"."""
    rng = np.random.default_rng(seed)
    views = []
    for sample in samples:
        if sample.num_layers < 2:
            continue
        layer = int(rng.integers(1, sample.num_layers))
        colour = parse_foreground_prompt(sample.layer_prompts[layer])
        others = [c for c in PALETTE if colour is None or c != colour[0]]
        views.append(single_object_view(sample, layer, others[rng.integers(len(others))])[0])
    return np.stack(views)


def fit_toy_vae(fit: VAEFitConfig, *, num_samples: int, data_seed: int, resolution: int) -> tuple[dict, float]:
    """The toy VAE fitted on the layers, masks and composites of `num_samples` synthetic samples; returns its
    parameters and the latent scaling factor that gives its latents unit variance."""
    vae = AutoencoderKL(toy_configs(build_toy_tokenizer().vocab_size)["vae"])
    images = collect_images(generate_sample(data_seed, i, resolution=resolution) for i in range(num_samples))
    params = init_params(vae, jax.random.key(fit.seed), to_model_range(images[:1]))
    params, losses = fit_vae(vae, params, images, fit)
    scale = latent_scaling_factor(vae, params, images[:1024])
    print(f"   toy VAE: reconstruction L1 {losses[-1][1]:.4f}; latent scaling factor {scale:.4f}", flush=True)
    return params, scale
