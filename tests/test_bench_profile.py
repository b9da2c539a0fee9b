"""scripts/bench.py --suite profile: XLA:CPU thunks and torch operators sorted into the same kinds of work."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from script_support import load_script

from layerdiff_jax.bench import profile


def _conv_then_dense(params, x):
    y = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(y.reshape(y.shape[0], -1) @ params["dense"]))


def test_xla_breakdown_finds_each_gradient_of_a_convolution_and_the_matmul():
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32),
              "dense": jnp.asarray(rng.standard_normal((8 * 8 * 8, 16)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 8)), jnp.float32)
    grads = jax.jit(jax.grad(_conv_then_dense, argnums=(0, 1)))  # the input gradient too
    kinds = profile.xla_breakdown(grads, (params, x), calls=2)
    assert {"conv forward", "conv input grad", "conv weight grad", "matmul"} <= set(kinds)
    assert all(ms > 0 for ms in kinds.values())
    assert set(kinds) <= set(profile.KINDS)


def test_torch_operators_are_sorted_into_the_same_kinds():
    assert profile.torch_kind("aten::convolution_backward") == "conv backward (both)"
    assert profile.torch_kind("aten::mkldnn_convolution") == "conv forward"
    assert profile.torch_kind("aten::addmm") == "matmul"
    assert profile.torch_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "matmul"
    assert profile.torch_kind("aten::native_group_norm_backward") == "reductions and norms"
    assert profile.torch_kind("aten::copy_") == "transposes and copies"
    assert profile.torch_kind("aten::silu") == "elementwise and other"


def test_profile_suite_quick_writes_both_sides_and_a_table(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert load_script("bench").main(["--suite", "profile", "--quick", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["profiles"]
    for side in ("ours_ms", "torch_ms"):
        assert result[side]["conv forward"] > 0 and result[side]["matmul"] > 0
    assert "conv weight grad" in result["ours_ms"] and "conv backward (both)" in result["torch_ms"]
    table = capsys.readouterr().out
    assert "quick UNet forward+backward" in table and "| **total** |" in table and "| conv weight grad |" in table
