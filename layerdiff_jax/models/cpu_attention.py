"""Fused attention on XLA:CPU: `cpu_attention.cc`, built with the machine's C++ compiler at first use.

The kernel is compiled once per source, jaxlib version and CPU (it is built for the CPU it runs on) into
`$LAYERDIFF_JAX_CACHE` (default `~/.cache/layerdiff_jax`), loaded with ctypes and registered as two XLA FFI
targets. `attention(q, k, v, key_valid, scale)` is differentiable through a custom VJP whose backward is the
kernel's own (it recomputes the softmax from the saved log-sum-exp). When the kernel cannot be built,
`unavailable()` says why, and `dot_product_attention` runs XLA attention instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w")
_FORWARD, _BACKWARD = "layerdiff_cpu_attention_forward", "layerdiff_cpu_attention_backward"


def _cache_dir() -> Path:
    return Path(os.environ.get("LAYERDIFF_JAX_CACHE", Path.home() / ".cache" / "layerdiff_jax")) / "cpu_attention"


def _cpu_signature() -> str:
    """The CPU's model and flags: -march=native builds for this CPU, so a cache shared between machines keys on it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build(compiler: str) -> Path:
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (_SOURCE.read_text(), jaxlib.__version__, " ".join(_FLAGS), compiler, _cpu_signature()))
    ).hexdigest()[:16]
    library = _cache_dir() / f"cpu_attention-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # built aside, then renamed: concurrent builds are safe
        built = Path(scratch) / library.name
        command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise RuntimeError(f"`{' '.join(command)}` failed:\n" + "\n".join(errors[:10]))
        os.replace(built, library)
    return library


@functools.cache
def unavailable() -> str | None:
    """Why the fused CPU kernel cannot run (None: it is built and registered). The compiler is $CXX, else g++."""
    return _load(os.environ.get("CXX", "g++"))


def _load(compiler: str) -> str | None:
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}; set CXX) to build the fused CPU attention kernel"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        forward, backward = library.LayerdiffCpuAttentionForward, library.LayerdiffCpuAttentionBackward
    except (OSError, RuntimeError, AttributeError) as error:
        return f"the fused CPU attention kernel did not build: {error}"
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(forward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(backward), platform="cpu")
    return None


# Operand and result layouts of the two targets: b batch, t queries, s keys, n heads, h head dim.
_LAYOUTS = {
    _FORWARD: ("btnh bsnh bsnh bs", "btnh bnt"),
    _BACKWARD: ("btnh bsnh bsnh bs btnh bnt btnh", "btnh bsnh bsnh"),
}


def _result_types(target: str, q, k, *_):
    batch, q_len, heads, _ = q.shape
    if target == _FORWARD:
        return jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)
    return tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, k))


def _kernel(target: str, scale: float, *args):
    return jax.ffi.ffi_call(target, _result_types(target, *args), vmap_method="sequential")(*args, scale=np.float32(scale))


def _partitioned(target: str):
    """`_kernel` for one target, split over a mesh the way its queries are: each device runs the kernel on its
    share of the batch and heads (lengths and the head dim stay whole), so sharded programs need no gathers."""
    operands, results = (layouts.split() for layouts in _LAYOUTS[target])

    @functools.partial(custom_partitioning, static_argnums=(0,))
    def call(scale, *args):
        return _kernel(target, scale, *args)

    def named(mesh, arg_shapes):
        spec = (*arg_shapes[0].sharding.spec, None, None, None, None)
        axes = {"b": spec[0], "n": spec[2]}
        return lambda layout: NamedSharding(mesh, PartitionSpec(*(axes.get(c) for c in layout)))

    def infer(scale, mesh, arg_shapes, result_shape):
        return tuple(map(named(mesh, arg_shapes), results))

    def partition(scale, mesh, arg_shapes, result_shape):
        sharding = named(mesh, arg_shapes)
        return mesh, functools.partial(_kernel, target, scale), tuple(map(sharding, results)), tuple(map(sharding, operands))

    call.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=", ".join(" ".join(x) for x in operands) + " -> " + ", ".join(" ".join(x) for x in results),
        need_replication_factors=("t", "h", "s"),  # in order of first appearance, as Shardy requires
    )
    return call


_forward_call, _backward_call = _partitioned(_FORWARD), _partitioned(_BACKWARD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, key_valid, scale: float):
    """softmax(scale q k^T, keys masked by key_valid) v on float32 (B, T, N, H) queries and (B, S, N, H) keys and
    values; key_valid is a (B, S) boolean. Call `unavailable()` first: it builds and registers the kernel."""
    return _forward_call(scale, q, k, v, key_valid)[0]


def _attention_fwd(q, k, v, key_valid, scale):
    out, lse = _forward_call(scale, q, k, v, key_valid)
    return out, (q, k, v, key_valid, out, lse)


def _attention_bwd(scale, residuals, dout):
    q, k, v, key_valid, out, lse = residuals
    dq, dk, dv = _backward_call(scale, q, k, v, key_valid, out, lse, dout.astype(jnp.float32))
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
