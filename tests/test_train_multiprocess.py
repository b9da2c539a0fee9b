"""Two real jax.distributed processes on localhost train, checkpoint, export; one process restores.

Each process has 2 simulated CPU devices and reads its own shard of the data; the mesh (1, 4, 1) splits
the parameters over all 4 devices, so both the orbax checkpoint and the exported model need the two
processes' shards. The run also computes in bfloat16 with rematerialised UNet blocks.
"""

import json
import subprocess

import flax
import jax
import numpy as np
import pytest
from train_support import (
    communicate_all,
    free_port,
    make_micro_sd_and_data,
    micro_config,
    restore_checkpoint,
    subprocess_env,
    train_command,
)

from layerdiff_jax.convert.model_folder import load_layerdiff

pytestmark = pytest.mark.slow  # end-to-end runs (see pyproject.toml)
STEPS = 2


def test_two_processes_train_and_single_process_restores(tmp_path):
    config = micro_config(*make_micro_sd_and_data(tmp_path), num_steps=STEPS, per_host_batch_size=2)
    config.mesh.shape = (1, 4, 1)
    config.model.compute_dtype = "bfloat16"  # float32 master weights, bfloat16 activations
    config.model.remat = True
    workdir, port = tmp_path / "run", free_port()
    processes = [
        subprocess.Popen(
            train_command(config, workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            env=subprocess_env(devices=2, fast_compile=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = communicate_all(processes, timeout=600)
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-4000:]
    assert f"finished at step {STEPS}; model folder" in outputs[0][0]

    # Each process saved its own data position: two shards of one stream.
    data_states = sorted((workdir / "checkpoints" / str(STEPS) / "data").glob("process_*-of-2.json"))
    assert [p.name for p in data_states] == ["process_0-of-2.json", "process_1-of-2.json"]
    shards = [json.loads(p.read_text()) for p in data_states]
    assert shards[0] != shards[1]

    # One process, one device: the 4-way sharded checkpoint restores whole and equals the exported model.
    step, state = restore_checkpoint(workdir, config)
    assert step == STEPS and int(state.step) == STEPS
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    exported = flax.traverse_util.flatten_dict(load_layerdiff(workdir / "model")[1], sep="/")
    restored = flax.traverse_util.flatten_dict(state.params, sep="/")
    assert exported.keys() == restored.keys()
    for key in exported:
        np.testing.assert_array_equal(restored[key], exported[key], err_msg=key)
    mu = flax.traverse_util.flatten_dict(state.opt_state[1][0].mu, sep="/")
    assert any(np.abs(v).max() > 0 for v in mu.values()), "the optimizer state came back too"
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["loss"]) for row in rows)
