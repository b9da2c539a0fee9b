"""The train state (one pytree: checkpointed, sharded and donated whole) and the optimizer.

Parameters, optimizer moments and EMA are float32 (the master weights); the compute dtype only changes the
activations. Gradient accumulation happens inside the train step (`step.py`), so the optimizer sees one
averaged gradient per update and its schedule counts updates.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from layerdiff_jax.mesh import logical_shardings
from layerdiff_jax.models.layerdiff import LayerDiffUNet


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    ema_params: Any  # None when EMA is off
    rng: jax.Array  # uint32 (2,) raw key: this step's randomness is split from it


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps` updates, then constant `learning_rate`; with `cooldown_steps`,
    a linear decay to 0 over the last that many of `num_steps` (warm-up, stable, decay)."""
    peak = train.learning_rate
    pieces, boundaries = [], []
    if train.warmup_steps:
        pieces.append(optax.linear_schedule(0.0, peak, train.warmup_steps))
        boundaries.append(train.warmup_steps)
    decay_start = max(train.num_steps - train.cooldown_steps, train.warmup_steps)
    if not train.cooldown_steps or decay_start > train.warmup_steps:
        pieces.append(optax.constant_schedule(peak))
    if train.cooldown_steps:
        if len(pieces) > len(boundaries):
            boundaries.append(decay_start)
        pieces.append(optax.linear_schedule(peak, 0.0, max(train.num_steps - decay_start, 1)))
    return optax.join_schedules(pieces, boundaries) if len(pieces) > 1 else pieces[0]


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warm-up schedule."""
    adamw = optax.adamw(
        learning_rate_schedule(train),
        b1=train.adam_b1,
        b2=train.adam_b2,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
    )
    if train.grad_clip_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adamw)


def create_train_state(params: Any, rng: jax.Array, *, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    """Step 0, with `rng` the raw key data (`jax.random.key_data`) of the training randomness. Pure, so it
    runs under `jax.eval_shape` (with boxed params) and `jax.jit` (with shardings)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        rng=rng,
    )


def abstract_boxed_state(model: LayerDiffUNet, tx: optax.GradientTransformation, *, ema: bool) -> TrainState:
    """The train state as ShapeDtypeStructs still boxed with logical axis names; nothing is allocated."""
    boxed_params = jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs())["params"]
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(lambda p, r: create_train_state(p, r, tx=tx, ema=ema), boxed_params, rng)


def state_initializer(shardings: TrainState, rng: jax.Array, *, tx: optax.GradientTransformation, ema: bool):
    """`params -> TrainState` at step 0, jitted to place the state with `shardings`; `rng` is the training key.
    Call it on global arrays, or under `jax.eval_shape` on `abstract_state`'s params."""
    rng_data = np.asarray(jax.random.key_data(rng))  # a constant of the jitted initialiser
    create = functools.partial(create_train_state, rng=rng_data, tx=tx, ema=ema)
    return jax.jit(create, out_shardings=shardings)


def frozen_param_shardings(modules: Mapping[str, tuple[nn.Module, tuple]], mesh) -> dict[str, Any]:
    """{name: shardings of the module's parameters on `mesh`} for frozen components given as
    {name: (module, example inputs)}; nothing is allocated."""
    boxed = {name: jax.eval_shape(module.init, jax.random.key(0), *example)["params"] for name, (module, example) in modules.items()}
    return logical_shardings(boxed, mesh)


def abstract_state(boxed_state: TrainState, mesh) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) for a boxed abstract state on `mesh`."""
    shardings = logical_shardings(boxed_state, mesh)
    shapes = nn.meta.unbox(boxed_state)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def bytes_per_device(abstract: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs with shardings (the largest shard of each leaf)."""
    return sum(
        jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(abstract)
    )
