"""Sharded training equals single-device training: meshes (8,1,1), (2,4,1), (2,2,2) on 8 simulated CPU devices.

The 8-device runs happen in a subprocess (XLA_FLAGS gives it 8 devices; this process keeps 1); the
1-device reference in another. Each runs the real trainer for 2 steps on the micro SD; losses and the
exported parameters must agree within float32 tolerance: the sharded programs reduce in other orders,
and Adam, which normalises each gradient element, turns rounding-level differences of near-zero
gradients into parameter differences of a fraction of the learning rate (measured: 2.3e-5 at lr 1e-3 in
one of 18432 elements), so the test runs at lr 1e-4 with atol 2e-5.
Then the (2,4,1) run resumes on the (2,2,2) mesh for a third step, which must match the reference too.
"""

import json
import subprocess
import sys

import flax
import numpy as np
import pytest
from train_support import make_micro_sd_and_data, micro_config, restore_checkpoint, subprocess_env

from layerdiff_jax.convert.model_folder import load_layerdiff
from layerdiff_jax.convert.unet import load_unet

pytestmark = pytest.mark.slow  # end-to-end runs (see pyproject.toml)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]

LR = 1e-4

RUNNER = r"""
import json, shutil, sys
import jax
from layerdiff_jax.training.metric_writer import read_metrics
from layerdiff_jax.training.trainer import train
from train_support import micro_config
LR = %r

sd, data, root, shapes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
report = {}
for shape in shapes:
    single = shape == [1, 1, 1]  # the reference: 3 steps, every step checkpointed
    config = micro_config(sd, data, num_steps=3 if single else 2, per_host_batch_size=8, learning_rate=LR)
    config.mesh.shape = tuple(shape)
    config.checkpoint.every_steps = 1 if single else 2
    if single:  # and a sample grid from the final parameters
        config.log.sample_every_steps, config.log.sample_count, config.log.sample_steps = 3, 2, 2
    name = "x".join(map(str, shape))
    result = train(config, f"{root}/{name}")
    params = result.state.params
    kernel = params["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    mu = result.state.opt_state[1][0].mu["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = sum(max(s.data.nbytes for s in x.addressable_shards) for x in jax.tree.leaves(params))
    report[name] = {
        "devices": len(kernel.sharding.device_set),
        "kernel_shard": list(kernel.addressable_shards[0].data.shape),
        "kernel_spec": str(kernel.sharding.spec),
        "mu_same_sharding": mu.sharding == kernel.sharding,
        "per_device_fraction": per_device / total,
        "losses": [row["loss"] for row in read_metrics(f"{root}/{name}")],
    }
if shapes != [[1, 1, 1]]:  # resume the (2,4,1) run on another mesh shape for one more step
    config = micro_config(sd, data, num_steps=3, per_host_batch_size=8, learning_rate=LR)
    config.mesh.shape = (2, 2, 2)
    shutil.copytree(f"{root}/2x4x1", f"{root}/2x4x1_on_2x2x2")
    result = train(config, f"{root}/2x4x1_on_2x2x2")
    report["2x4x1_on_2x2x2"] = {"losses": [row["loss"] for row in read_metrics(f"{root}/2x4x1_on_2x2x2")]}
print("REPORT" + json.dumps(report))
""" % LR


def _start(devices, sd, data, root, shapes):
    cmd = [sys.executable, "-c", RUNNER, str(sd), str(data), str(root), json.dumps(shapes)]
    return subprocess.Popen(cmd, env=subprocess_env(devices, fast_compile=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report(process):
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-4000:]
    return json.loads(out.split("REPORT", 1)[1])


def _flat(params):
    return flax.traverse_util.flatten_dict(params, sep="/")


def _assert_close(params, reference, what):
    assert params.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(params[key], reference[key], atol=2e-5, rtol=1e-4, err_msg=f"{what}: {key}")


def test_meshes_match_one_device(tmp_path):
    sd, data = make_micro_sd_and_data(tmp_path)
    runs = tmp_path / "runs"
    sharded = _start(8, sd, data, runs, MESHES)
    single = _start(1, sd, data, runs, [(1, 1, 1)])
    reference, report = _report(single)["1x1x1"], _report(sharded)
    config = micro_config(sd, data)
    ref_params = {step: _flat(restore_checkpoint(runs / "1x1x1", config, step)[1].params) for step in (2, 3)}

    for shape in MESHES:
        name = "x".join(map(str, shape))
        got = report[name]
        assert got["devices"] == 8
        np.testing.assert_allclose(got["losses"], reference["losses"][:2], rtol=1e-5)
        _assert_close(_flat(load_layerdiff(runs / name / "model")[1]), ref_params[2], name)
        # Parameters really are split: fsdp over the kernel's input width, tensor over its output width.
        data, fsdp, tensor = shape
        assert got["kernel_shard"] == [32 // fsdp, 32 // tensor], got
        assert got["mu_same_sharding"], "Adam's moments are placed like the parameters"
        if fsdp * tensor > 1:
            assert got["per_device_fraction"] < 1.5 / (fsdp * tensor), got
        else:
            assert got["per_device_fraction"] == pytest.approx(1.0)

    # Resumed from the (2,4,1) checkpoint on a (2,2,2) mesh: step 3 as on one device.
    np.testing.assert_allclose(report["2x4x1_on_2x2x2"]["losses"], reference["losses"], rtol=1e-5)
    _assert_close(_flat(load_layerdiff(runs / "2x4x1_on_2x2x2" / "model")[1]), ref_params[3], "resumed on (2,2,2)")

    assert (runs / "1x1x1" / "samples" / "step_0000003.png").is_file()
    sd_conv_in = load_unet(sd / "unet")[1]["conv_in"]["kernel"]
    assert np.abs(ref_params[3]["unet/conv_in/kernel"] - sd_conv_in).max() > 1e-4, "training moved the parameters"
