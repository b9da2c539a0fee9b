"""Parameterised building blocks that carry logical axis names.

Every model in this package builds its Dense/Conv/norm/embedding layers through these constructors so
that each parameter is annotated with logical axes (mapped to the mesh by `layerdiff_jax.sharding`).
Parameters are always stored in float32 (`param_dtype`); `dtype` is the compute dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

_default_kernel_init = nn.initializers.lecun_normal()


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    axes: Sequence[str | None] = ("embed", "mlp"),
    kernel_init=_default_kernel_init,
) -> nn.Dense:
    """A Dense layer; `axes` names the kernel's (in, out) dims, the bias takes the out axis."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_partitioned(kernel_init, axes),
        bias_init=_partitioned(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    strides: int = 1,
    padding: Any = "SAME",
    axes: Sequence[str | None] = ("embed", "mlp"),
    kernel_init=_default_kernel_init,
) -> nn.Conv:
    """A 2-D NHWC convolution with an HWIO kernel; `axes` names the (in, out) channel dims."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_partitioned(kernel_init, ("conv_height", "conv_width", *axes)),
        bias_init=_partitioned(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


def group_norm(num_groups: int, epsilon: float, *, name: str, dtype: Dtype = jnp.float32) -> nn.GroupNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2, for exact parity.
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(epsilon: float, *, name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def embed(num_embeddings: int, features: int, *, name: str, dtype: Dtype = jnp.float32) -> nn.Embed:
    return nn.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=_partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
        name=name,
    )
