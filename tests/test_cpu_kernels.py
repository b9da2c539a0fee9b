"""The fused CPU kernels for GroupNorm (+ SiLU) and GEGLU (attention's are in test_attention.py): each matches
torch forward and backward, GroupNorm keeps nn.GroupNorm's parameters, both fall back to XLA ops where they do
not run (with one log line when they cannot be built), and both are split over a mesh by batch without gathers.
All three kernels, built for AVX2 without AVX-512 whatever this CPU is, match XLA forward and backward."""

import logging
import platform
import re
import shutil
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from script_support import run_on_cpu_devices

from layerdiff_jax.models import cpu_kernels, layers
from layerdiff_jax.models.unet_blocks import GEGLU


def _torch_group_norm(x, scale, bias, groups, silu):
    """torch.nn.GroupNorm (+ SiLU) on NCHW, with the gradients of sum(sin(out)) for x, scale and bias."""
    tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    norm = torch.nn.GroupNorm(groups, x.shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(np.asarray(scale)))
        norm.bias.copy_(torch.tensor(np.asarray(bias)))
    out = norm(tx)
    out = torch.nn.functional.silu(out) if silu else out
    torch.sin(out).sum().backward()
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()  # noqa: E731
    return nhwc(out), nhwc(tx.grad), norm.weight.grad.numpy(), norm.bias.grad.numpy()


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)  # an offset mean: the two-pass variance matters
    scale, bias = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))
    return x, scale, bias


def _apply(module, x, scale, bias):
    return module.apply({"params": {"scale": scale, "bias": bias}}, x)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape, groups", [((2, 8, 8, 64), 32), ((1, 5, 3, 96), 32), ((3, 7, 16), 4)])
def test_fused_group_norm_matches_torch_forward_and_backward(shape, groups, silu):
    """A batch of one, pixel counts that are not whole vectors (15), 3 channels per group, a (B, L, C) input."""
    assert cpu_kernels.unavailable() is None
    x, scale, bias = _inputs(shape)
    module = layers.group_norm(groups, 1e-5, silu=silu, name="norm")
    torch_shape = x if x.ndim == 4 else x[:, :, None, :]  # torch's GroupNorm takes (B, C, L) as an image of width 1
    want, *want_grads = _torch_group_norm(torch_shape, scale, bias, groups, silu)

    forward = jax.jit(lambda *a: _apply(module, *a))
    np.testing.assert_allclose(forward(x, scale, bias), want.reshape(shape), atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(_apply(module, *a))), argnums=(0, 1, 2)))(x, scale, bias)
    np.testing.assert_allclose(grads[0], want_grads[0].reshape(shape), atol=1e-5)
    for got, ref in zip(grads[1:], want_grads[1:]):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)  # sums over up to 256 pixels
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(_apply(module, x, scale, bias)))).lower(x).as_text()
    assert "layerdiff_cpu_group_norm_forward" in hlo and "layerdiff_cpu_group_norm_backward" in hlo


def test_parameters_are_nn_group_norms():
    """Checkpoints and converted weights do not depend on which path runs: same names, shapes and axes."""
    x = jnp.ones((2, 4, 4, 8))
    ours = layers.group_norm(4, 1e-5, silu=True, name="norm").init(jax.random.key(0), x)["params"]
    theirs = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, nn.meta.unbox(ours)) == jax.tree.map(jnp.shape, theirs)
    assert ours["scale"].names == ours["bias"].names == ("norm",)


def test_xla_ops_where_the_kernel_does_not_run(monkeypatch, caplog):
    x, scale, bias = _inputs((2, 4, 4, 16), seed=1)
    module = layers.group_norm(4, 1e-5, silu=True, name="norm")
    want = jax.nn.silu(_apply(nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False), x, scale, bias))

    bf16 = jax.jit(lambda x: _apply(module, x, scale, bias)).lower(x.astype(jnp.bfloat16)).as_text()
    assert "layerdiff_cpu_group_norm" not in bf16  # the kernel is float32 only

    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "no C++ compiler ('g++'; set CXX)")
    cpu_kernels._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        for _ in range(2):
            got = _apply(module, x, scale, bias)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert [r.getMessage() for r in caplog.records] == [
        "no C++ compiler ('g++'; set CXX); GroupNorms and GEGLUs run as XLA ops"
    ]


def test_empty_batches_and_constant_inputs():
    """No division by zero for a batch of none; a constant group normalises to 0 (then bias), as in torch."""
    scale, bias = jnp.ones(32), jnp.full(32, 0.5)
    assert cpu_kernels.group_norm(jnp.zeros((0, 4, 4, 32)), scale, bias, 8, 1e-5, True).shape == (0, 4, 4, 32)
    grad = jax.grad(lambda x: cpu_kernels.group_norm(x, scale, bias, 8, 1e-5, True).sum())(jnp.zeros((0, 4, 4, 32)))
    assert grad.shape == (0, 4, 4, 32)
    assert cpu_kernels.geglu(jnp.zeros((0, 3, 8))).shape == (0, 3, 4)
    np.testing.assert_array_equal(cpu_kernels.group_norm(jnp.full((2, 3, 32), 7.0), scale, bias, 8, 1e-5, False), 0.5)


def test_the_kernel_refuses_bad_shapes_with_a_clear_error():
    x, scale, bias = _inputs((2, 4, 4, 16))
    with pytest.raises(Exception, match="scale and bias must have x's channel count"):
        cpu_kernels.group_norm(x, scale[:8], bias[:8], 4, 1e-5, False).block_until_ready()
    with pytest.raises(Exception, match="multiple of the group count"):
        cpu_kernels.group_norm(x, scale, bias, 3, 1e-5, False).block_until_ready()


def _torch_geglu(h):
    th = torch.tensor(np.asarray(h), requires_grad=True)
    value, gate = th.chunk(2, dim=-1)
    out = value * torch.nn.functional.gelu(gate)
    torch.sin(out).sum().backward()
    return out.detach().numpy(), th.grad.numpy()


@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 7, 9, 64)])
def test_fused_geglu_matches_torch_forward_and_backward(shape):
    """Odd feature counts (5, 33) and image-shaped tokens (B, H, W, C)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    module = GEGLU(features=shape[-1] // 2 + 1)
    params = nn.meta.unbox(module.init(jax.random.key(0), x))
    project = lambda x: x @ params["params"]["proj"]["kernel"] + params["params"]["proj"]["bias"]  # noqa: E731
    want, want_grad = _torch_geglu(project(x))

    out = jax.jit(module.apply)(params, x)
    np.testing.assert_allclose(out, want, atol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(module.apply(params, x))))(x)
    want_x_grad = want_grad @ np.asarray(params["params"]["proj"]["kernel"]).T
    np.testing.assert_allclose(grad, want_x_grad, atol=1e-5)
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(module.apply(params, x))))).lower(x).as_text()
    assert "layerdiff_cpu_geglu_forward" in hlo and "layerdiff_cpu_geglu_backward" in hlo


def test_geglu_runs_xla_ops_off_float32_and_without_the_kernels(monkeypatch):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 16)), jnp.float32)
    module = GEGLU(features=8)
    params = nn.meta.unbox(module.init(jax.random.key(0), x))
    fused = module.apply(params, x)
    assert "layerdiff_cpu_geglu" not in jax.jit(GEGLU(features=8, dtype=jnp.bfloat16).apply).lower(params, x).as_text()
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "no C++ compiler ('g++'; set CXX)")
    assert "layerdiff_cpu_geglu" not in jax.jit(module.apply).lower(params, x).as_text()
    np.testing.assert_allclose(module.apply(params, x), fused, atol=1e-6)


SHARDED_SCRIPT = """
import json
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from layerdiff_jax.models import layers

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 4, 4, 32)) * 2 + 1, jnp.float32)
params = {"scale": jnp.asarray(rng.standard_normal(32), jnp.float32), "bias": jnp.asarray(rng.standard_normal(32), jnp.float32)}
x = jax.device_put(x, NamedSharding(mesh, P("data")))
result = {}
for name, module in (("fused", layers.group_norm(8, 1e-5, silu=True, name="n")),
                     ("xla", nn.Sequential([nn.GroupNorm(num_groups=8, use_fast_variance=False), nn.silu]))):
    wrap = (lambda p: {"params": p}) if name == "fused" else (lambda p: {"params": {"layers_0": p}})
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(wrap(p), x)))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (dp, dx) = step(params, x)
    text = step.lower(params, x).compile().as_text()
    result[name] = {"value": float(value), "dx": np.asarray(dx).tolist(), "dscale": np.asarray(dp["scale"]).tolist(),
                    "gathers": text.count("all-gather"), "kernel": "layerdiff_cpu_group_norm_backward" in text,
                    "dx_spec": str(dx.sharding.spec)}

from layerdiff_jax.models import cpu_kernels
h = jax.device_put(jnp.asarray(rng.standard_normal((8, 16, 64)), jnp.float32), NamedSharding(mesh, P("data")))
plain = lambda h: (lambda value, gate: value * jax.nn.gelu(gate, approximate=False))(*jnp.split(h, 2, axis=-1))
for name, geglu in (("fused_geglu", cpu_kernels.geglu), ("xla_geglu", plain)):
    step = jax.jit(jax.value_and_grad(lambda h: jnp.sum(jnp.sin(geglu(h)))))
    value, dh = step(h)
    text = step.lower(h).compile().as_text()
    result[name] = {"value": float(value), "dx": np.asarray(dh).tolist(), "gathers": text.count("all-gather"),
                    "kernel": "layerdiff_cpu_geglu_backward" in text, "dx_spec": str(dh.sharding.spec)}
print(json.dumps(result))
"""


def test_fused_kernels_are_split_over_a_mesh_by_batch_without_gathers():
    result = run_on_cpu_devices(SHARDED_SCRIPT)
    assert result["fused"]["kernel"] and not result["xla"]["kernel"]
    assert result["fused"]["gathers"] == 0 and result["fused"]["dx_spec"].startswith("P('data'")
    assert result["fused"]["value"] == pytest.approx(result["xla"]["value"], rel=1e-6)  # a sum of 4,096 values
    np.testing.assert_allclose(result["fused"]["dx"], result["xla"]["dx"], atol=1e-5)
    np.testing.assert_allclose(result["fused"]["dscale"], result["xla"]["dscale"], atol=1e-4)
    assert result["fused_geglu"]["kernel"] and not result["xla_geglu"]["kernel"]
    assert result["fused_geglu"]["gathers"] == 0 and result["fused_geglu"]["dx_spec"].startswith("P('data'")
    assert result["fused_geglu"]["value"] == pytest.approx(result["xla_geglu"]["value"], rel=1e-6)
    np.testing.assert_allclose(result["fused_geglu"]["dx"], result["xla_geglu"]["dx"], atol=1e-5)


AVX2_SCRIPT = """
import json
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from layerdiff_jax.models import cpu_kernels

reason = cpu_kernels.unavailable()
rng = np.random.default_rng(0)
normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
# Lengths with tails past whole 8- and 16-float vectors (19 keys, 40 channels, 37 features) and a block of 8
# queries plus single rows (11).
q, k, v = normal(2, 11, 2, 5), normal(2, 19, 2, 5), normal(2, 19, 2, 5)
key_valid = jnp.asarray(rng.random((2, 19)) > 0.3).at[:, 0].set(True)
x, scale, bias = normal(2, 5, 3, 40) * 3 + 1, normal(40), normal(40)
h = normal(2, 5, 74)
norm = nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False)
mask = key_valid[:, None, None, :]
cases = {  # the kernel and XLA's ops, on the same arguments
    "attention": ((q, k, v), lambda q, k, v: cpu_kernels.attention(q, k, v, key_valid, 0.5),
                  lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.5, implementation="xla")),
    "group_norm": ((x, scale, bias), lambda x, s, b: cpu_kernels.group_norm(x, s, b, 8, 1e-5, True),
                   lambda x, s, b: jax.nn.silu(norm.apply({"params": {"scale": s, "bias": b}}, x))),
    "geglu": ((h,), cpu_kernels.geglu,
              lambda h: (lambda value, gate: value * jax.nn.gelu(gate, approximate=False))(*jnp.split(h, 2, axis=-1))),
}


def outputs(f, args):
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args)))))(*args)
    return [np.asarray(y).tolist() for y in (jax.jit(f)(*args), *grads)]


result = {"unavailable": reason}
if reason is None:
    result.update({name: {"fused": outputs(fused, args), "xla": outputs(xla, args)}
                   for name, (args, fused, xla) in cases.items()})
print(json.dumps(result))
"""
# AVX-512 in a disassembly: an EVEX-encoded instruction (first byte 62, after any segment or address-size
# prefix), a mask register (the k instructions are VEX-encoded), or a call to libmvec's AVX-512 variants.
AVX512 = re.compile(r"^\s*[0-9a-f]+:\t(?:(?:2e|3e|26|36|64|65|67) )*62 [0-9a-f ]*\tv|%k[0-7]\b|_ZGVe[NM]\d", re.MULTILINE)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64-v3 is an x86 target")
def test_the_avx2_build_matches_xla_forward_and_backward(tmp_path, monkeypatch):
    """The kernels built for x86-64-v3 (AVX2 and FMA), the code CPUs without AVX-512 run, on any CPU: they build,
    use no AVX-512 instruction, and match XLA within the tolerances the native build's tests hold to torch."""
    monkeypatch.setenv("LAYERDIFF_CPU_KERNELS_MARCH", "x86-64-v3")
    monkeypatch.setenv("LAYERDIFF_JAX_CACHE", str(tmp_path))
    result = run_on_cpu_devices(AVX2_SCRIPT, devices=1)
    assert result.pop("unavailable") is None
    assert set(result) == {"attention", "group_norm", "geglu"}
    for name, outputs in result.items():
        for i, (got, want) in enumerate(zip(outputs["fused"], outputs["xla"])):
            sums = name == "group_norm" and i >= 2  # dscale and dbias: sums over the pixels
            tolerance = {"atol": 1e-4, "rtol": 1e-5} if sums else {"atol": 1e-5}
            np.testing.assert_allclose(got, want, **tolerance, err_msg=f"{name}, output {i}")
    (library,) = (tmp_path / "cpu_kernels").glob("cpu_kernels-*.so")
    if shutil.which("objdump"):  # binutils comes with g++ on Debian and Ubuntu; elsewhere the check is skipped
        code = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
        assert "%ymm" in code and not AVX512.search(code)
