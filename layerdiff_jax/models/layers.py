"""Parameterised building blocks that carry logical axis names.

Every model in this package builds its Dense/Conv/norm/embedding layers through these constructors so
that each parameter is annotated with logical axes (mapped to the mesh by `layerdiff_jax.sharding`).
Parameters are always stored in float32 (`param_dtype`); `dtype` is the compute dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from layerdiff_jax.models import cpu_kernels

Dtype = Any

_default_kernel_init = nn.initializers.lecun_normal()


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Token sequences (B, ..., T, D) sharded over the batch only, as the UNet's feature maps are: left to itself,
    XLA splits text tokens along their width too and moves them with all-to-alls and partial-sum all-reduces."""
    return nn.with_logical_constraint(x, ("batch", *[None] * (x.ndim - 3), "length", "embed"))


def _gathered_kernel(op, kernel_axes: Sequence[str | None]):
    """`op` (a dot or convolution) whose kernel is first constrained to `kernel_axes` with "embed", the axis
    FSDP shards, gathered. The kernel arrives cast to the compute dtype, so FSDP's all-gather moves bfloat16
    when the model computes in it, once per use (again in a rematerialised backward pass); its transpose
    reduce-scatters the gradient onto the shards. Without it XLA may keep the kernel sharded and move the
    activations instead (all-to-alls). Without a mesh the constraint does nothing."""
    use_axes = tuple(None if a == "embed" else a for a in kernel_axes)

    def call(lhs, rhs, *args, **kwargs):
        return op(lhs, nn.with_logical_constraint(rhs, use_axes), *args, **kwargs)

    return call


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
        dot_general=_gathered_kernel(lax.dot_general, axes),
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
        conv_general_dilated=_gathered_kernel(lax.conv_general_dilated, ("conv_height", "conv_width", *axes)),
        name=name,
    )


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (the same parameters), then SiLU when `silu`. On CPUs, float32 calls run the fused kernel of
    `cpu_kernels` (XLA:CPU runs a GroupNorm's reductions and the SiLU after it as several slow passes); where
    that kernel cannot be built (`cpu_kernels.unavailable()` says why), and on other backends, XLA ops."""

    silu: bool = False

    @nn.compact
    def __call__(self, x, *, mask=None):
        if self._fused(x, mask):
            features = (x.shape[-1],)
            scale = self.param("scale", self.scale_init, features, self.param_dtype)
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            return cpu_kernels.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.silu)
        y = super().__call__(x, mask=mask)
        return nn.silu(y) if self.silu else y

    def _fused(self, x, mask) -> bool:
        return (
            jnp.dtype(self.dtype or jnp.float32) == jnp.float32
            and self.param_dtype == jnp.float32
            and mask is None
            and self.use_scale
            and self.use_bias
            and self.group_size is None
            and self.num_groups is not None
            and x.ndim >= 2
            and x.shape[-1] % self.num_groups == 0
            and cpu_kernels.runs_on(x)
        )


def group_norm(num_groups: int, epsilon: float, *, name: str, dtype: Dtype = jnp.float32, silu: bool = False) -> GroupNorm:
    """GroupNorm over `num_groups` groups of channels, then SiLU when `silu` (fused on CPUs)."""
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2, for exact parity.
    return GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        silu=silu,
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
