"""All attention in the package goes through `dot_product_attention`.

That single function is where the kernel is chosen, so switching it for every model is one config value,
`attention_impl`:

- "auto" (the configs' default): "cpu" on CPUs, "xla" on GPUs and TPUs, where "cudnn" and "splash" are chosen
  by a config (docs/accelerators.md, "Which attention on which chip"). Calls the CPU kernel does not take run XLA attention
  without a log line; a kernel that could not be built is logged once.
- "xla": plain XLA ops, any backend. Computed heads-major: (B, T, N, H) is transposed to (B, N, T, H) before
  the two matmuls, so they are batched matmuls over leading axes: XLA:CPU lowers
  `jax.nn.dot_product_attention`'s einsums over (B, T, N, H) with large transposes and a materialised
  broadcast of the logits' scale, and runs a UNet markedly slower with them (docs/experiments.md).
- "cudnn": cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) on NVIDIA GPUs.
- "splash": the Pallas splash-attention kernel on TPUs (`jax.experimental.pallas.ops.tpu.splash_attention`).
- "cpu": the project's fused float32 kernel for XLA:CPU (`cpu_kernels.cc`, built at first use), which never
  writes the logits out; XLA:CPU has no fused attention of its own.

A boolean key mask (padded layers, padded prompts) works with each. cuDNN takes it as an additive bias of
shape (B, 1, T, S); splash takes it as segment ids (queries in segment 0, masked keys in segment 1). Calls a
kernel cannot take (float32 under cuDNN, head dims over its limit, another backend, masks that are not key
masks under splash) run the "xla" path instead, with one log line per reason. The CPU kernel takes key masks as a (B, S) boolean. cuDNN's backward takes even
lengths only, so odd ones are padded by a query row and a key that nothing attends to (`_cudnn_attention`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.mesh import BATCH_AXES
from layerdiff_jax.models import cpu_kernels, layers
from layerdiff_jax.models.backend import target_backend

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "cpu")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_SPLASH_BLOCK = 128  # TPU lane width: splash pads sequence lengths and the head dim to multiples of it
_fallbacks_logged: set[tuple[str, str]] = set()
_fallback_recorders: list[list[str]] = []


def _fall_back(implementation: str, reason: str) -> None:
    for recorder in _fallback_recorders:
        recorder.append(f"{implementation}: {reason}")
    if (implementation, reason) not in _fallbacks_logged:
        _fallbacks_logged.add((implementation, reason))
        log.warning("attention_impl=%r: %s; those calls use XLA attention", implementation, reason)


@contextlib.contextmanager
def recorded_fallbacks():
    """Yields a list that collects every fallback to XLA attention traced inside the block ("impl: reason",
    logged or not), so that a benchmark can say which kernel its program really runs."""
    found: list[str] = []
    _fallback_recorders.append(found)
    try:
        yield found
    finally:
        _fallback_recorders.remove(found)


def _xla_attention(query, key, value, mask, is_causal):
    """softmax(q k^T / sqrt(H) masked) v on (B, T, N, H); logits and softmax in float32."""
    scale = np.float32(query.shape[-1] ** -0.5)
    q = jnp.swapaxes(query * scale.astype(query.dtype), 1, 2)  # (B, N, T, H)
    k, v = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)  # (B, N, T, S)
    if is_causal:
        t, s = logits.shape[-2:]
        causal = jnp.tril(jnp.ones((t, s), bool), s - t)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.swapaxes(jnp.matmul(weights, v), 1, 2)


def _is_key_mask(mask, batch: int, kv_len: int) -> bool:
    return mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[0] in (1, batch) and mask.shape[3] == kv_len


def _pad_to(x, axis: int, multiple: int):
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _cudnn_unsupported(query, key, mask, is_causal) -> str | None:
    """Why cuDNN flash attention cannot take this call (None: it can)."""
    if target_backend() != "gpu":
        return f"cuDNN needs an NVIDIA GPU, the backend is {target_backend()}"
    if query.dtype not in _CUDNN_DTYPES:
        return f"cuDNN takes bfloat16/float16, got {query.dtype}"
    head_dim = query.shape[-1]
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    max_head_dim = 256 if float(capability) >= 9.0 else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN takes head dims that are multiples of 8 up to {max_head_dim}, got {head_dim}"
    if is_causal and query.shape[1] % 2 != key.shape[1] % 2:  # padding one side only would shift the diagonal
        return f"cuDNN's causal attention is padded to even lengths on both sides alike, got {query.shape[1]} queries and {key.shape[1]} keys"
    return None


def _cudnn_attention(query, key, value, mask, is_causal, implementation: str = "cudnn"):
    """cuDNN flash attention on (B, T, N, H). Its backward takes even lengths only (CLIP's 77 tokens are odd),
    so an odd length is padded by one: a zero query row, sliced off the output, and a zero key no query may
    attend to (cuDNN's own padding mask through `key_value_seq_lengths`, or a False column of the key mask).
    `implementation` is jax's kernel name: tests run the same padding with "xla" on a CPU."""
    batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
    query, key, value = _pad_to(query, 1, 2), _pad_to(key, 1, 2), _pad_to(value, 1, 2)
    kv_lengths = None
    if mask is not None:  # cuDNN's bias must span (T, S): the key mask broadcast over the queries
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], q_len, kv_len))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, query.shape[1] - q_len), (0, 0)), constant_values=True)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, key.shape[1] - kv_len)), constant_values=False)
    elif key.shape[1] != kv_len:
        kv_lengths = jnp.full((batch,), kv_len, jnp.int32)
    out = jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=is_causal, key_value_seq_lengths=kv_lengths, implementation=implementation
    )
    return out[:, :q_len]


@functools.cache
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, is_causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (q_len, kv_len)
    head_mask = splash.CausalMask(shape) if is_causal else splash.FullMask(shape)
    block = splash.BlockSizes(
        block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
        block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK, block_kv_dkv_compute=_SPLASH_BLOCK,
        block_q_dq=_SPLASH_BLOCK, block_kv_dq=_SPLASH_BLOCK,
    )
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * num_heads), block_sizes=block, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    return kernel, splash.SegmentIds


def _splash_attention(query, key, value, mask, is_causal, interpret: bool = False):
    """Splash attention on (B, T, N, H): q pre-scaled; lengths and head dim zero-padded to multiples of 128
    (zero columns add nothing to q.k or to the output's kept columns); padded and masked keys sit in
    segment 1, which the queries (segment 0) never attend to."""
    batch, q_len, num_heads, head_dim = query.shape
    kv_len = key.shape[1]
    q = _pad_to(_pad_to(query * np.float32(head_dim**-0.5).astype(query.dtype), 1, _SPLASH_BLOCK), 3, _SPLASH_BLOCK)
    k = _pad_to(_pad_to(key, 1, _SPLASH_BLOCK), 3, _SPLASH_BLOCK)
    v = _pad_to(_pad_to(value, 1, _SPLASH_BLOCK), 3, _SPLASH_BLOCK)
    padded_q, padded_kv = q.shape[1], k.shape[1]
    kernel, segment_ids = _splash_kernel(num_heads, padded_q, padded_kv, is_causal, interpret)
    key_valid = jnp.arange(padded_kv) < kv_len
    key_valid = jnp.broadcast_to(key_valid, (batch, padded_kv))
    if mask is not None:
        key_valid = key_valid & _pad_to(jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len)), 1, _SPLASH_BLOCK)
    segments = segment_ids(q=jnp.zeros((batch, padded_q), jnp.int32), kv=jnp.where(key_valid, 0, 1).astype(jnp.int32))
    call = lambda q, k, v, segments: jax.vmap(kernel)(q, k, v, segment_ids=segments)  # noqa: E731
    out = _per_batch_shard(call, q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), segments)  # (B, N, T, H)
    return out.swapaxes(1, 2)[:, :q_len, :, :head_dim]


def _per_batch_shard(fn, *args):
    """`fn(*args)` run on each device's share of the batch (the leading axis) under the mesh being traced for: XLA
    cannot partition a Pallas kernel by itself. Without a mesh, or a batch the batch axes do not divide, a plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if not axes or args[0].shape[0] % math.prod(mesh.shape[a] for a in axes):
        return fn(*args)
    spec = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(*args)


def _splash_unsupported(query, key, mask, is_causal) -> str | None:
    if target_backend() != "tpu":
        return f"splash attention needs a TPU, the backend is {target_backend()}"
    if mask is not None and not _is_key_mask(mask, query.shape[0], key.shape[1]):
        return f"splash attention takes key masks of shape (B, 1, 1, S), got {mask.shape}"
    if is_causal and query.shape[1] != key.shape[1]:
        return "splash attention's causal mask needs as many queries as keys"
    return None


def _cpu_unsupported(query, key, mask, is_causal) -> str | None:
    if target_backend() != "cpu":
        return f"the fused CPU kernel runs on CPUs, the backend is {target_backend()}"
    if query.dtype != jnp.float32 or key.dtype != jnp.float32:
        return f"the fused CPU kernel takes float32, got {query.dtype}"
    if is_causal:
        return "the fused CPU kernel takes no causal mask"
    if mask is not None and not _is_key_mask(mask, query.shape[0], key.shape[1]):
        return f"the fused CPU kernel takes key masks of shape (B, 1, 1, S), got {mask.shape}"
    return cpu_kernels.unavailable()


def _cpu_attention(query, key, value, mask):
    batch, kv_len = query.shape[0], key.shape[1]
    key_valid = jnp.ones((batch, kv_len), bool) if mask is None else jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))
    return cpu_kernels.attention(query, key, value, key_valid, query.shape[-1] ** -0.5)


def _as_4d_mask(mask):
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def kernel_refusal(
    implementation: str, query: jax.Array, key: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False
) -> str | None:
    """Why `implementation`'s kernel would not take this call, so that `dot_product_attention` runs XLA
    attention instead (None: the kernel runs; always None for "xla" and "auto")."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {implementation!r}")
    mask = _as_4d_mask(mask)
    if implementation == "cudnn":
        return _cudnn_unsupported(query, key, mask, is_causal)
    if implementation == "splash":
        return _splash_unsupported(query, key, mask, is_causal)
    if implementation == "cpu":
        return _cpu_unsupported(query, key, mask, is_causal)
    return None


def _auto(query, key, mask, is_causal) -> str:
    """The kernel "auto" runs for this call: the fused one on CPUs when it takes the call, else XLA."""
    if target_backend() != "cpu":
        return "xla"
    reason = _cpu_unsupported(query, key, mask, is_causal)
    if reason is not None and reason == cpu_kernels.unavailable():
        _fall_back("auto", reason)
    return "cpu" if reason is None else "xla"


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """Scaled dot-product attention on (batch, length, heads, head_dim) tensors.

    `mask` is boolean, broadcastable to (batch, heads, q_len, kv_len); True means "may attend".
    """
    mask = _as_4d_mask(mask)
    if implementation == "auto":
        implementation = _auto(query, key, mask, is_causal)
    reason = kernel_refusal(implementation, query, key, mask=mask, is_causal=is_causal)
    if reason is not None:
        _fall_back(implementation, reason)
    if implementation == "xla" or reason is not None:
        return _xla_attention(query, key, value, mask, is_causal)
    if implementation == "cudnn":
        return _cudnn_attention(query, key, value, mask, is_causal)
    if implementation == "cpu":
        return _cpu_attention(query, key, value, mask)
    return _splash_attention(query, key, value, mask, is_causal)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out_0).

    Self-attention when `context` is None, cross-attention otherwise. Tokens are (batch, length, width).
    """

    heads: int
    head_dim: int
    out_features: int | None = None  # defaults to the query width
    qkv_bias: bool = False
    zero_init_out: bool = False  # LayerDiff's new blocks start as the identity
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, *, mask=None, is_causal=False):
        context = x if context is None else context
        inner = self.heads * self.head_dim
        out_features = self.out_features or x.shape[-1]

        def project(name, tokens):
            y = layers.dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), dtype=self.dtype, name=name)(tokens)
            return y.reshape(*y.shape[:-1], self.heads, self.head_dim)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=self.attention_impl)
        out = out.reshape(*out.shape[:-2], inner)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else nn.initializers.lecun_normal()
        return layers.dense(out_features, axes=("heads", "embed"), kernel_init=out_init, dtype=self.dtype, name="to_out_0")(out)
