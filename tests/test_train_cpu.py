"""configs/shapes_cpu.py trains on this CPU: a shortened run's loss falls well below its start."""

import flax
import jax
import numpy as np
import pytest
from train_support import load_config

from layerdiff_jax.convert.model_folder import load_layerdiff, load_scheduler_config
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.training.metric_writer import read_metrics
from layerdiff_jax.training.trainer import train

pytestmark = pytest.mark.slow  # end-to-end runs (see pyproject.toml)
STEPS = 80  # the full 300-step run: docs/experiments.md ("2026-11-26 and before")


def test_shapes_cpu_loss_falls(tmp_path):
    config = load_config("shapes_cpu")
    config.train.num_steps = STEPS
    result = train(config, tmp_path)
    assert result.step == STEPS and not result.stopped_early

    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == list(range(10, STEPS + 1, 10))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"\nshapes_cpu: loss {first:.3f} (steps 1-10) -> {last:.3f} (steps {STEPS - 9}-{STEPS}); "
          f"{rows[-1]['steps_per_sec']:.2f} steps/s")
    assert last < 0.7 * first, (first, last)  # measured: 1.17 -> 0.66
    assert {"loss_image", "loss_mask", "grad_norm", "learning_rate", "steps_per_sec"} <= rows[-1].keys()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # The exported model folder holds the final parameters and loads as sampling loads it.
    model, params = load_layerdiff(result.model_dir)
    assert model.config.enhancer_heads == 4
    final = flax.traverse_util.flatten_dict(jax.device_get(result.state.params), sep="/")
    for key, value in flax.traverse_util.flatten_dict(params, sep="/").items():
        np.testing.assert_array_equal(value, final[key], err_msg=key)
    for component in ("vae", "text_encoder", "tokenizer"):
        assert (result.model_dir / component).is_dir()
    assert load_scheduler_config(result.model_dir) == SchedulerConfig()  # shapes_cpu trains as SD 1.5 does
    assert (tmp_path / "checkpoints" / str(STEPS)).is_dir()
