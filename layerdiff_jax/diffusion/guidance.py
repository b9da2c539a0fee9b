"""Classifier-free guidance with LayerDiff's layer-aware negative prompts.

Instead of the empty prompt, the unconditional branch uses prompts that name what a layer must NOT
contain: the global and background negatives list the foreground objects, and each foreground's
negative is "the background".
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from layerdiff_jax.diffusion.ddim import ModelFn
from layerdiff_jax.diffusion.settings import BACKGROUND_PROMPT
from layerdiff_jax.mesh import interleave_rows

BACKGROUND_NEGATIVE = BACKGROUND_PROMPT
# Foreground phrases are joined like a CLIP prompt list ("a cat, a red ball"): a comma keeps each
# object a separate phrase for the text encoder, and matches how SD users write negative prompts.
PROMPT_JOINER = ", "

ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def layer_aware_negatives(layer_prompts: Sequence[str]) -> tuple[str, list[str]]:
    """Negative prompts for one request with layer prompts ``[p0 (background), p1, ..., pk]``.

    Returns ``(negative_global, negative_layer_prompts)``:
      negative_global = ", ".join(p1..pk)
      negative_layer_prompts[0] = ", ".join(p1..pk)   (the background must not contain the objects)
      negative_layer_prompts[i] = "the background"   for every foreground i >= 1.
    With no foreground layers both foreground-joined negatives are "" (the usual empty prompt).
    """
    if len(layer_prompts) == 0:
        raise ValueError("layer_prompts needs at least the background prompt")
    if not all(isinstance(p, str) for p in layer_prompts):
        raise TypeError(f"layer prompts must be strings, got {[type(p).__name__ for p in layer_prompts]}")
    foreground = PROMPT_JOINER.join(layer_prompts[1:])
    return foreground, [foreground] + [BACKGROUND_NEGATIVE] * (len(layer_prompts) - 1)


def classifier_free_guidance(eps_cond: jax.Array, eps_uncond: jax.Array, scale: float) -> jax.Array:
    """``eps_uncond + scale * (eps_cond - eps_uncond)``."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_model_fn(apply_fn: ApplyFn, cond: Any, uncond: Any, scale: float) -> ModelFn:
    """Turns a conditional model into a guided ``model_fn(x, t)`` for ``ddim_sample``.

    ``apply_fn(x, t, conditions) -> eps``; ``cond`` / ``uncond`` are pytrees of the same structure whose
    leaves have the batch size of x as their leading axis. Conditional and unconditional branches run
    as ONE model call, as in diffusers' pipelines, on a batch in which each sample's two rows are neighbours
    (`mesh.interleave_rows`): where the batch is sharded, a sample's branches stay on its device.
    Build it inside the jitted sampling function so the conditions are traced, not baked-in constants.
    """
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError(
            f"cond and uncond must have the same structure: {jax.tree.structure(cond)} vs "
            f"{jax.tree.structure(uncond)}"
        )
    for c, u in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond)):
        if jnp.shape(c) != jnp.shape(u):
            raise ValueError(f"cond leaf shape {jnp.shape(c)} != uncond leaf shape {jnp.shape(u)}")

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        for leaf in jax.tree.leaves(cond):
            if jnp.shape(leaf)[:1] != (batch,):
                raise ValueError(f"condition leaf shape {jnp.shape(leaf)} must lead with batch {batch}")
        both = jax.tree.map(interleave_rows, cond, uncond)
        eps = apply_fn(interleave_rows(x, x), interleave_rows(t, t), both).reshape(batch, 2, *x.shape[1:])
        return classifier_free_guidance(eps[:, 0], eps[:, 1], scale)

    return model_fn
