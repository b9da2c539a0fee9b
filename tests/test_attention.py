"""The attention implementations (auto, xla, cudnn, splash, cpu): each matches JAX's or torch's reference with
padded-key masking, kernels fall back to XLA off their hardware with one log line, and say why they would not run."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from script_support import run_on_cpu_devices

from layerdiff_jax.models import attention, cpu_kernels


def _qkv(seed, batch=2, q_len=12, kv_len=5, heads=2, head_dim=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((batch, n, heads, head_dim)), dtype) for n in (q_len, kv_len, kv_len)]


KEY_VALID = jnp.array([[True, True, False, True, False], [True, False, False, False, False]])


def _reference(q, k, v, mask=None, is_causal=False):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


@pytest.mark.parametrize("mask", [None, KEY_VALID[:, None, None, :]])
def test_xla_attention_matches_jax_with_and_without_key_mask(mask):
    q, k, v = _qkv(0)
    got = attention.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(got, _reference(q, k, v, mask), atol=1e-6)
    grad = jax.grad(lambda q: jnp.sum(attention.dot_product_attention(q, k, v, mask=mask) ** 2))(q)
    ref_grad = jax.grad(lambda q: jnp.sum(_reference(q, k, v, mask) ** 2))(q)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)


def test_masked_keys_have_no_influence():
    q, k, v = _qkv(1)
    out = attention.dot_product_attention(q, k, v, mask=KEY_VALID[:, None, None, :])
    changed = v.at[:, 2].set(100.0).at[:, 4].set(-100.0)  # keys 2 and 4 are padding in both samples
    np.testing.assert_allclose(attention.dot_product_attention(q, k, changed, mask=KEY_VALID[:, None, None, :]), out, atol=1e-6)


def test_xla_causal_attention_matches_jax():
    q, _, _ = _qkv(2, q_len=7, kv_len=7)
    np.testing.assert_allclose(attention.dot_product_attention(q, q, q, is_causal=True), _reference(q, q, q, is_causal=True), atol=1e-6)


def test_splash_kernel_wiring_matches_xla_in_interpret_mode():
    """The TPU splash path (padding to 128, key mask as segment ids), run by Pallas' interpreter on CPU."""
    q, k, v = _qkv(3, q_len=20, kv_len=5, head_dim=8)
    mask = KEY_VALID[:, None, None, :]
    got = attention._splash_attention(q, k, v, mask, False, interpret=True)
    np.testing.assert_allclose(got, _reference(q, k, v, mask), atol=1e-5)
    grad = jax.grad(lambda q: jnp.sum(attention._splash_attention(q, k, v, mask, False, interpret=True)))(q)
    np.testing.assert_allclose(grad, jax.grad(lambda q: jnp.sum(_reference(q, k, v, mask)))(q), atol=1e-5)
    causal = attention._splash_attention(q, q, q, None, True, interpret=True)
    np.testing.assert_allclose(causal, _reference(q, q, q, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_kernels_fall_back_to_xla_off_their_hardware_with_one_log_line(impl, caplog):
    q, k, v = _qkv(4)
    mask = KEY_VALID[:, None, None, :]
    attention._fallbacks_logged.clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        first = attention.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        attention.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    np.testing.assert_allclose(first, _reference(q, k, v, mask), atol=1e-6)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"attention_impl={impl!r}" in lines[0] and "XLA attention" in lines[0]


def test_unknown_attention_impl_is_rejected():
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attention.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attention.kernel_refusal("flash", q, k)


def test_kernel_refusal_says_why_a_kernel_does_not_run_here():
    q, k, _ = _qkv(6, dtype=jnp.bfloat16)
    assert attention.kernel_refusal("xla", q, k) is None
    assert "cuDNN needs an NVIDIA GPU" in attention.kernel_refusal("cudnn", q, k)
    assert "splash attention needs a TPU" in attention.kernel_refusal("splash", q, k, mask=KEY_VALID)


@pytest.mark.parametrize("q_len, kv_len", [(12, 5), (7, 77), (9, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_padding_of_odd_lengths_is_exact(q_len, kv_len, masked):
    """cuDNN's backward takes even lengths only: `_cudnn_attention` pads a query row (sliced off) and a key no
    query attends to. Run through jax's XLA kernel here, output and gradients equal the unpadded attention."""
    q, k, v = _qkv(7, q_len=q_len, kv_len=kv_len)
    mask = None
    if masked:
        key_valid = np.ones((2, kv_len), bool)
        key_valid[0, -2:] = key_valid[1, 1:3] = False
        mask = jnp.asarray(key_valid)[:, None, None, :]

    def padded(q, k, v):
        return attention._cudnn_attention(q, k, v, mask, False, implementation="xla")

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    np.testing.assert_allclose(padded(q, k, v), _reference(q, k, v, mask), atol=1e-6)
    got = jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(lambda q, k, v: _reference(q, k, v, mask), *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_cudnn_causal_padding_keeps_the_diagonal(monkeypatch):
    q, _, _ = _qkv(8, q_len=77, kv_len=77)
    got = attention._cudnn_attention(q, q, q, None, True, implementation="xla")
    np.testing.assert_allclose(got, _reference(q, q, q, is_causal=True), atol=1e-6)
    # The rules as on a GPU: odd lengths are taken (padded), but causal with one odd side is refused.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, _ = _qkv(9, q_len=8, kv_len=7, dtype=jnp.bfloat16)
    assert attention.kernel_refusal("cudnn", q, k, mask=KEY_VALID[:, :1].repeat(7, 1)) is None
    assert attention.kernel_refusal("cudnn", q, k) is None
    assert "causal" in attention.kernel_refusal("cudnn", q, k, is_causal=True)
    assert attention.kernel_refusal("cudnn", q, q, is_causal=True) is None


def _torch_sdpa_with_grads(q, k, v, key_valid):
    import torch

    tq, tk, tv = (torch.from_numpy(np.array(x)).permute(0, 2, 1, 3).requires_grad_() for x in (q, k, v))
    mask = torch.from_numpy(np.asarray(key_valid))[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    torch.sin(out).sum().backward()
    return [x.detach().permute(0, 2, 1, 3).numpy() for x in (out, tq.grad, tk.grad, tv.grad)]


@pytest.mark.parametrize("q_len, kv_len, head_dim", [(13, 77, 8), (16, 5, 40), (9, 33, 3)])
def test_fused_cpu_kernel_matches_torch_sdpa_forward_and_backward(q_len, kv_len, head_dim):
    """Lengths that are not whole vectors (77, 5, 33), a head dim that is not a power of two, a key mask."""
    assert cpu_kernels.unavailable() is None
    q, k, v = _qkv(10, batch=3, q_len=q_len, kv_len=kv_len, heads=2, head_dim=head_dim)
    key_valid = np.random.default_rng(11).random((3, kv_len)) > 0.3
    key_valid[:, 0] = True
    mask = jnp.asarray(key_valid)[:, None, None, :]

    def fused(q, k, v):
        return attention.dot_product_attention(q, k, v, mask=mask, implementation="cpu")

    out, *grads = _torch_sdpa_with_grads(q, k, v, key_valid)
    np.testing.assert_allclose(jax.jit(fused)(q, k, v), out, atol=1e-5)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fused(*a))), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, grads):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert "layerdiff_cpu_attention_backward" in jax.jit(jax.grad(lambda q: fused(q, k, v).sum())).lower(q).as_text()


def test_fused_cpu_kernel_with_every_key_masked_averages_the_values_like_xla():
    q, k, v = _qkv(12)
    mask = jnp.array([[True, False, True, False, False], [False] * 5])[:, None, None, :]

    def loss(impl, q, k, v):
        return jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, mask=mask, implementation=impl)))

    np.testing.assert_allclose(
        attention.dot_product_attention(q, k, v, mask=mask, implementation="cpu"), _reference(q, k, v, mask), atol=1e-6
    )
    got = jax.grad(lambda *a: loss("cpu", *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_auto_runs_the_fused_kernel_on_cpu_and_xla_where_it_refuses(caplog):
    q, k, v = _qkv(13)
    attention._fallbacks_logged.clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        fused = jax.jit(lambda q: attention.dot_product_attention(q, k, v, implementation="auto")).lower(q).as_text()
        causal = jax.jit(lambda q: attention.dot_product_attention(q, q, q, is_causal=True, implementation="auto"))
        np.testing.assert_allclose(causal(q), _reference(q, q, q, is_causal=True), atol=1e-6)
    assert "layerdiff_cpu_attention_forward" in fused
    assert "layerdiff_cpu_attention" not in causal.lower(q).as_text()
    assert not caplog.records  # calls the kernel does not take are not news under "auto"
    assert "takes no causal mask" in attention.kernel_refusal("cpu", q, q, is_causal=True)
    assert "takes float32" in attention.kernel_refusal("cpu", *_qkv(13, dtype=jnp.bfloat16)[:2])
    assert attention.kernel_refusal("auto", q, k) is None


def test_a_kernel_that_cannot_be_built_says_why_and_auto_falls_back_with_one_log_line(monkeypatch, caplog):
    assert "no C++ compiler ('no-such-compiler'" in cpu_kernels._load("no-such-compiler")
    assert "did not build" in cpu_kernels._load("false")
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "no C++ compiler ('g++'; set CXX)")
    q, k, v = _qkv(14)
    attention._fallbacks_logged.clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        for _ in range(2):
            got = attention.dot_product_attention(q, k, v, implementation="auto")
    np.testing.assert_allclose(got, _reference(q, k, v), atol=1e-6)
    assert [r.getMessage() for r in caplog.records] == [
        "attention_impl='auto': no C++ compiler ('g++'; set CXX); those calls use XLA attention"
    ]


SHARDED_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from layerdiff_jax.models import attention

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((8, 16, 4, 8)), jnp.float32) for _ in range(3))
mask = jnp.asarray(rng.random((8, 1, 1, 16)) > 0.2).at[..., 0].set(True)
heads = NamedSharding(mesh, P("data", None, "tensor", None))
args = [jax.device_put(x, heads) for x in (q, k, v)] + [jax.device_put(mask, NamedSharding(mesh, P("data")))]
result = {}
for impl in ("xla", "cpu"):
    loss = lambda q, k, v, m: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, mask=m, implementation=impl)))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, grads = step(*args)
    result[impl] = {"value": float(value), "grads": [np.asarray(g).tolist() for g in grads],
                    "gathers": step.lower(*args).compile().as_text().count("all-gather"),
                    "dq_spec": str(grads[0].sharding.spec)}
print(json.dumps(result))
"""


def test_fused_cpu_kernel_is_split_over_a_mesh_without_gathers():
    """custom_partitioning: on 8 devices each runs the kernel on its share of batch and heads."""
    result = run_on_cpu_devices(SHARDED_SCRIPT)
    assert result["cpu"]["gathers"] == 0 and result["cpu"]["dq_spec"].startswith("P('data', None, 'tensor'")
    assert abs(result["cpu"]["value"] - result["xla"]["value"]) < 1e-4
    for got, want in zip(result["cpu"]["grads"], result["xla"]["grads"]):
        np.testing.assert_allclose(got, want, atol=1e-5)
