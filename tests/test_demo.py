"""The main job end to end, shortened: every stage runs from the shipped base and every output exists and re-imports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerdiff_jax.convert.model_folder import load_sampling_settings, load_scheduler_config
from layerdiff_jax.data.layers import list_sample_folders, read_sample_folder
from layerdiff_jax.toy import TOY_BASE

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # end-to-end runs (see pyproject.toml)


def test_shortened_demo_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    overrides = {
        "out_dir": str(out),
        "data.num_train": 24,
        "finetune.train.num_steps": 2,
        "finetune.train.per_host_batch_size": 2,
        "finetune.checkpoint.every_steps": 1,
        "finetune.log.every_steps": 1,
        "sample.per_layer_count": 1,
        "sample.step0_per_layer_count": 1,
        "data.colour_weights": "black:3",
        "sample.steps": 2,
        "sample.batch_size": 3,
    }
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), *(f"--config.{k}={v}" for k, v in overrides.items())]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "overall" in result.stdout and str(out) in result.stdout

    folders = list_sample_folders(out / "samples")
    assert len(folders) == 3
    assert sorted(read_sample_folder(f).num_layers for f in folders) == [2, 3, 4]
    for folder in folders:
        assert (folder / "layers.ora").is_file() and (folder / "layers.psd").is_file()
    assert (out / "samples" / "contact_sheet.png").is_file()
    assert (out / "train" / "model" / "layerdiff" / "flax_params.safetensors").is_file()
    # The model folder tells sampling what the demo trained: velocity targets.
    assert load_scheduler_config(out / "train" / "model").prediction_type == "v_prediction"
    # ... and the settings it was sampled and scored with: sample.py's and edit.py's defaults (training's export).
    recorded = load_sampling_settings(out / "train" / "model")
    assert (recorded.steps, recorded.guidance) == (2, 1.0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"2", "3", "4", "overall"}
    assert metrics["demo"]["timings_s"]["total_s"] > 0
    assert metrics["demo"]["base"] == str(TOY_BASE)
    # The score before fine-tuning sits beside the final one, from its own samples.
    assert set(metrics["step0"]["groups"]) == {"2", "3", "4", "overall"}
    assert len(list_sample_folders(out / "step0" / "samples")) == 3
    assert "before fine-tuning (step 0)" in result.stdout


def test_scratch_base_is_a_toy_sd_with_a_fitted_vae(tmp_path):
    """--config.base=scratch: a random toy SD, its VAE fitted on the synthetic world first (as before the toy base)."""
    from configs import demo
    from layerdiff_jax.convert.sd_folder import load_sd
    from layerdiff_jax.demo import base_folder
    from layerdiff_jax.models.vae import VAEConfig

    config = demo.get_config()
    config.base = "scratch"
    config.finetune.model.toy_vae.steps = 2
    config.finetune.model.toy_vae.num_samples = 2
    folder = base_folder(config, config.finetune, tmp_path)
    assert folder == tmp_path / "toy_sd"
    # The fit sets the scaling factor from the fitted latents' spread; a random toy SD keeps SD's default.
    assert load_sd(folder)["vae"][0].config.scaling_factor != VAEConfig().scaling_factor
