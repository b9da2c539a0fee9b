"""Fused kernels for XLA:CPU (`cpu_kernels.cc`): attention, GroupNorm (+ SiLU) and GEGLU, built with the machine's
C++ compiler.

The library is compiled at first use, once per source, jaxlib version, target and CPU, into `$LAYERDIFF_JAX_CACHE`
(default `~/.cache/layerdiff_jax`), loaded with ctypes and registered as XLA FFI targets. `attention(q, k, v,
key_valid, scale)`, `group_norm(x, scale, bias, groups, epsilon, silu)` and `geglu(h)` are differentiable through
custom VJPs whose backwards are the library's own. When the library cannot be built, `unavailable()` says why,
and the models run the same operations as XLA ops instead.

The target is the compiler's `-march=$LAYERDIFF_CPU_KERNELS_MARCH`, by default `native` (the CPU it runs on).
`x86-64-v3` (AVX2 and FMA) checks the AVX2 code path on any machine, and builds for a fleet's lowest common CPU
so that every machine runs the same code; `x86-64-v4` is AVX-512. Vectors are 512 bits wide where the target has
AVX-512, else 256. A target the compiler does not know, or that needs instructions this CPU lacks, leaves the
kernels unavailable.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import re
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

from layerdiff_jax.models.backend import target_backend

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_FLAGS = ("-O3", "-ffast-math", "-std=c++17", "-shared", "-fPIC", "-w")  # and the target's, from _target_flags
_ATTENTION_FORWARD, _ATTENTION_BACKWARD = "layerdiff_cpu_attention_forward", "layerdiff_cpu_attention_backward"
_NORM_FORWARD, _NORM_BACKWARD = "layerdiff_cpu_group_norm_forward", "layerdiff_cpu_group_norm_backward"
_GEGLU_FORWARD, _GEGLU_BACKWARD = "layerdiff_cpu_geglu_forward", "layerdiff_cpu_geglu_backward"


def _cache_dir() -> Path:
    return Path(os.environ.get("LAYERDIFF_JAX_CACHE", Path.home() / ".cache" / "layerdiff_jax")) / "cpu_kernels"


def _cpu_signature() -> str:
    """The CPU's model and flags: -march=native builds for this CPU, and other targets are checked against it, so a
    cache shared between machines keys on it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _run(command: list[str]) -> str:
    """The command's output; a RuntimeError with the compiler's errors when it fails."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        raise RuntimeError(f"`{' '.join(command)}` failed:\n" + "\n".join(errors[:10]))
    return result.stdout


# The instruction sets a compiler uses in code without intrinsics, as -march's predefined macros name them (the
# kernels use no intrinsics, so AES, AMX, PKU and the like are beside the point, and virtual machines hide some).
_GENERATED = re.compile(r"^#define __((?:SSE|SSSE|AVX|FMA|F16C|BMI|LZCNT|POPCNT|MOVBE|XOP|ABM)[A-Z0-9_]*)__ ", re.MULTILINE)


def _instruction_sets(compiler: str, march: str) -> set[str]:
    """The instruction sets code compiled for -march=<march> may use (AVX2, AVX512F, ...)."""
    return set(_GENERATED.findall(_run([compiler, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull])))


def _target_flags(compiler: str, march: str) -> list[str]:
    """-march and the vector width to match it. A target that needs instructions this CPU lacks is refused: its
    library would kill the process with an illegal instruction."""
    target = _instruction_sets(compiler, march)
    if march != "native":
        missing = target - _instruction_sets(compiler, "native")
        if missing:
            raise RuntimeError(f"-march={march} needs instructions this CPU lacks: {', '.join(sorted(missing))}")
    width = 512 if "AVX512F" in target else 256  # without AVX-512, wider vectors are only split in two
    return [f"-march={march}", f"-mprefer-vector-width={width}"]


def _build(compiler: str, march: str) -> Path:
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (_SOURCE.read_text(), jaxlib.__version__, " ".join(_FLAGS), march, compiler, _cpu_signature()))
    ).hexdigest()[:16]
    library = _cache_dir() / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    flags = _target_flags(compiler, march)
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # built aside, then renamed: concurrent builds are safe
        built = Path(scratch) / library.name
        _run([compiler, *_FLAGS, *flags, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built), "-lm"])
        os.replace(built, library)
    return library


@functools.cache
def unavailable() -> str | None:
    """Why the fused CPU kernels cannot run (None: they are built and registered). The compiler is $CXX, else g++;
    the target $LAYERDIFF_CPU_KERNELS_MARCH, else native."""
    return _load(os.environ.get("CXX", "g++"), os.environ.get("LAYERDIFF_CPU_KERNELS_MARCH", "native"))


def _load(compiler: str, march: str = "native") -> str | None:
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}; set CXX) to build the fused CPU kernels"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler, march)))
        # The handler of target layerdiff_cpu_group_norm_forward is LayerdiffCpuGroupNormForward, and so on.
        handlers = {target: getattr(library, target.title().replace("_", "")) for target in _LAYOUTS}
    except (OSError, RuntimeError, AttributeError) as error:
        return f"the fused CPU kernels did not build: {error}"
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return None


def runs_on(*arrays) -> bool:
    """Whether the fused kernels run on these arrays: float32 on the CPU backend, with the library built (when it
    cannot be, the reason is logged once and the models run XLA ops instead)."""
    if target_backend() != "cpu" or any(jnp.dtype(x.dtype) != jnp.float32 for x in arrays):
        return False
    reason = unavailable()
    if reason is not None:
        _log_once(f"{reason}; GroupNorms and GEGLUs run as XLA ops")
    return reason is None


@functools.cache
def _log_once(message: str) -> None:
    log.warning(message)


# Each target's operand and result layouts, one letter per axis: b batch, t queries (or tokens), s keys, n heads,
# h head dim; l pixels, c channels, g groups; p a projection's width, f half of it. Every result is float32.
_LAYOUTS = {
    _ATTENTION_FORWARD: ("btnh bsnh bsnh bs", "btnh bnt"),
    _ATTENTION_BACKWARD: ("btnh bsnh bsnh bs btnh bnt btnh", "btnh bsnh bsnh"),
    _NORM_FORWARD: ("blc c c", "blc bg bg"),
    _NORM_BACKWARD: ("blc c c bg bg blc", "blc bc bc"),
    _GEGLU_FORWARD: ("btp", "btf"),
    _GEGLU_BACKWARD: ("btp btf", "btp"),
}
# Result sizes the operands do not show.
_DERIVED_SIZES = {
    _NORM_FORWARD: lambda sizes, attributes: {"g": attributes["groups"]},
    _GEGLU_FORWARD: lambda sizes, attributes: {"f": sizes["p"] // 2},
}
_SPLIT = "bn"  # the axes a call is split over on a mesh, as its first operand is; every other axis stays whole


def _kernel(target: str, attributes: tuple, *args):
    operands, results = (layouts.split() for layouts in _LAYOUTS[target])
    sizes = {letter: n for layout, x in zip(operands, args) for letter, n in zip(layout, x.shape)}
    if target in _DERIVED_SIZES:
        sizes.update(_DERIVED_SIZES[target](sizes, dict(attributes)))
    result_types = tuple(jax.ShapeDtypeStruct(tuple(sizes[letter] for letter in layout), jnp.float32) for layout in results)
    # Attributes as the handlers declare them: floats as float32, integers as int64.
    typed = {name: value if isinstance(value, bool) else np.float32(value) if isinstance(value, float) else np.int64(value)
             for name, value in attributes}
    return jax.ffi.ffi_call(target, result_types, vmap_method="sequential")(*args, **typed)


def _partitioned(target: str):
    """`_kernel` for one target, split over a mesh the way its first operand is on the batch and heads (every
    other axis stays whole), so sharded programs need no gathers. Called as call(attributes, *args), attributes
    being a tuple of (name, value) pairs."""
    operands, results = (layouts.split() for layouts in _LAYOUTS[target])
    letters = "".join(dict.fromkeys("".join(operands + results)))

    @functools.partial(custom_partitioning, static_argnums=(0,))
    def call(attributes, *args):
        return _kernel(target, attributes, *args)

    def named(mesh, arg_shapes):
        spec = (*arg_shapes[0].sharding.spec, *[None] * len(operands[0]))
        axes = {letter: spec[i] for i, letter in enumerate(operands[0]) if letter in _SPLIT}
        return lambda layout: NamedSharding(mesh, PartitionSpec(*(axes.get(c) for c in layout)))

    def infer(attributes, mesh, arg_shapes, result_shape):
        return tuple(map(named(mesh, arg_shapes), results))

    def partition(attributes, mesh, arg_shapes, result_shape):
        sharding = named(mesh, arg_shapes)
        local = functools.partial(_kernel, target, attributes)
        return mesh, local, tuple(map(sharding, results)), tuple(map(sharding, operands))

    call.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=", ".join(" ".join(x) for x in operands) + " -> " + ", ".join(" ".join(x) for x in results),
        need_replication_factors=tuple(c for c in letters if c not in _SPLIT),  # in order of first appearance
    )
    return call


_attention_forward, _attention_backward = _partitioned(_ATTENTION_FORWARD), _partitioned(_ATTENTION_BACKWARD)
_norm_forward, _norm_backward = _partitioned(_NORM_FORWARD), _partitioned(_NORM_BACKWARD)
_geglu_forward, _geglu_backward = _partitioned(_GEGLU_FORWARD), _partitioned(_GEGLU_BACKWARD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, key_valid, scale: float):
    """softmax(scale q k^T, keys masked by key_valid) v on float32 (B, T, N, H) queries and (B, S, N, H) keys and
    values; key_valid is a (B, S) boolean. Call `unavailable()` first: it builds and registers the kernels."""
    return _attention_forward((("scale", scale),), q, k, v, key_valid)[0]


def _attention_fwd(q, k, v, key_valid, scale):
    out, lse = _attention_forward((("scale", scale),), q, k, v, key_valid)
    return out, (q, k, v, key_valid, out, lse)


def _attention_bwd(scale, residuals, dout):
    q, k, v, key_valid, out, lse = residuals
    dq, dk, dv = _attention_backward((("scale", scale),), q, k, v, key_valid, out, lse, dout.astype(jnp.float32))
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, bias, groups: int, epsilon: float, silu: bool):
    """GroupNorm of a float32 (B, ..., C) array over `groups` groups of channels (statistics over the pixels and
    the group's channels, as torch.nn.GroupNorm), then scale and bias per channel, then SiLU when `silu`. Call
    `unavailable()` first: it builds and registers the kernels."""
    return _group_norm_fwd(x, scale, bias, groups, epsilon, silu)[0]


def _norm_attributes(groups, silu, epsilon=None):
    """The kernels' attributes; the backward takes no epsilon, as it reads the saved 1 / std."""
    epsilon = () if epsilon is None else (("epsilon", float(epsilon)),)
    return (("groups", int(groups)), *epsilon, ("silu", bool(silu)))


def _group_norm_fwd(x, scale, bias, groups, epsilon, silu):
    pixels = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])
    y, mean, rstd = _norm_forward(_norm_attributes(groups, silu, epsilon), pixels, scale, bias)
    return y.reshape(x.shape), (pixels, scale, bias, mean, rstd)


def _group_norm_bwd(groups, epsilon, silu, residuals, dy):
    pixels, scale, bias, mean, rstd = residuals
    flat = dy.reshape(pixels.shape).astype(jnp.float32)
    dx, dscale, dbias = _norm_backward(_norm_attributes(groups, silu), pixels, scale, bias, mean, rstd, flat)
    return dx.reshape(dy.shape), dscale.sum(0), dbias.sum(0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


@jax.custom_vjp
def geglu(h):
    """value * gelu(gate), exact gelu, on a float32 (B, T, 2F) projection whose last axis is [value, gate]. Call
    `unavailable()` first: it builds and registers the kernels."""
    return _geglu_forward((), h)[0]


def _geglu_fwd(h):
    return geglu(h), h


def _geglu_bwd(h, dout):
    return (_geglu_backward((), h, dout.astype(jnp.float32))[0],)


geglu.defvjp(_geglu_fwd, _geglu_bwd)
