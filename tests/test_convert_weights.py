"""scripts/convert_weights.py: diffusers folders and single files in, a folder the loaders read out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_support import load_script
from test_single_file import assert_same_params, build_tiny_sd, ldm_state_dict, non_weight_entries, write_ldm_file

from layerdiff_jax.convert.clip_text import load_text_encoder
from layerdiff_jax.convert.core import ConversionError, load_torch_file
from layerdiff_jax.convert.sd_folder import load_sd, save_converted
from layerdiff_jax.convert.unet import load_unet
from layerdiff_jax.convert.vae import load_vae

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_weights.py"
LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder}


convert_weights = load_script("convert_weights")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers folder, LDM single file, params of each component converted from the folder, torch models)."""
    root = tmp_path_factory.mktemp("convert")
    models = build_tiny_sd(root / "sd")
    single = write_ldm_file(root / "tiny.safetensors", {**ldm_state_dict(models), **non_weight_entries()})
    reference = {name: load(root / "sd" / name)[1] for name, load in LOADERS.items()}
    return root / "sd", single, reference, models


def _check_output(output: Path, reference: dict, *, tokenizer: bool) -> dict:
    for name, load in LOADERS.items():
        assert sorted(p.name for p in (output / name).iterdir()) == ["config.json", "flax_params.safetensors"]
        _, params = load(output / name)
        assert_same_params(params, reference[name])
    assert (output / "tokenizer").is_dir() == tokenizer
    record = json.loads((output / "layerdiff_conversion.json").read_text())
    assert record["parameters"]["total"] == sum(record["parameters"][n] for n in LOADERS) > 0
    return record


def test_help():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--source", "--output", "--tokenizer", "--config", "--overwrite"):
        assert flag in result.stdout


def test_converts_a_diffusers_folder(tiny, tmp_path, capsys):
    folder, _, reference, _ = tiny
    assert convert_weights.main(["--source", str(folder), "--output", str(tmp_path / "out")]) == 0
    stdout = capsys.readouterr().out
    record = _check_output(tmp_path / "out", reference, tokenizer=True)
    assert record["source_format"] == "diffusers_folder"
    for name in LOADERS:
        assert f"{record['parameters'][name]:,} parameters" in stdout  # progress line and summary
    # config.json is the source's, token ids and all.
    assert json.loads((tmp_path / "out/text_encoder/config.json").read_text()) == json.loads(
        (folder / "text_encoder/config.json").read_text()
    )
    copied = sorted(p.name for p in (tmp_path / "out/tokenizer").iterdir())
    assert copied == sorted(p.name for p in (folder / "tokenizer").iterdir())


def test_converts_a_single_file(tiny, tmp_path, capsys):
    folder, single, reference, _ = tiny
    output = tmp_path / "out"
    tokenizer = folder / "tokenizer"
    assert convert_weights.main(
        ["--source", str(single), "--config", str(folder), "--tokenizer", str(tokenizer), "--output", str(output)]
    ) == 0
    record = _check_output(output, reference, tokenizer=True)
    assert record["source_format"] == "single_file"

    # Without a tokenizer (--config given as a copy without tokenizer/): converted, with a warning;
    # --overwrite replaces the earlier output, tokenizer included.
    configs_only = tmp_path / "configs"
    for name in LOADERS:
        (configs_only / name).mkdir(parents=True)
        (configs_only / name / "config.json").write_bytes((folder / name / "config.json").read_bytes())
    capsys.readouterr()
    argv = ["--source", str(single), "--config", str(configs_only), "--output", str(output), "--overwrite"]
    assert convert_weights.main(argv) == 0
    assert "no tokenizer copied" in capsys.readouterr().out
    _check_output(output, reference, tokenizer=False)


def test_configs_written_from_our_dataclasses_round_trip(tiny, tmp_path):
    """With no source config.json to copy (a single file in SD 1.5's default shape), config.json comes from
    the config dataclass's `to_diffusers_config()`, and the loaders rebuild the same modules from it."""
    folder, single, reference, _ = tiny
    components = load_sd(single, config_dir=folder)
    record = save_converted(tmp_path / "out", components, source=single)
    assert record["tokenizer"] is None
    _check_output(tmp_path / "out", reference, tokenizer=False)
    for name, load in LOADERS.items():
        module, _ = load(tmp_path / "out" / name)
        assert module.config == components[name][0].config
        assert json.loads((tmp_path / "out" / name / "config.json").read_text()) == module.config.to_diffusers_config()


def test_errors(tiny, tmp_path, capsys):
    folder, single, _, models = tiny
    with pytest.raises(SystemExit) as exit_:
        convert_weights.main(["--source", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert convert_weights.main(["--source", str(folder), "--output", str(existing)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "mine" and not (existing / "unet").exists()

    with pytest.raises(SystemExit):
        convert_weights.main(["--source", str(folder), "--config", str(folder), "--output", str(tmp_path / "o")])
    assert "--config is only for single-file sources" in capsys.readouterr().err

    assert convert_weights.main(["--source", str(folder), "--output", str(folder), "--overwrite"]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # A checkpoint that doesn't match: the offending keys are named, nothing is written.
    state = ldm_state_dict(models)
    state["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = torch.zeros(16)
    bad = write_ldm_file(tmp_path / "bad.ckpt", state)
    assert convert_weights.main(["--source", str(bad), "--config", str(folder), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "model.diffusion_model.input_blocks.99.0.in_layers.0.weight" in err
    assert not (tmp_path / "o").exists()

    # Without --config the architecture is SD 1.5's, which the tiny file does not have (4 VAE blocks, not 2).
    assert convert_weights.main(["--source", str(single), "--output", str(tmp_path / "o")]) == 1
    assert "first_stage_model.encoder.down.3.block.0.*" in capsys.readouterr().err


def test_output_checks_keep_what_a_user_put_there(tiny, tmp_path, capsys):
    folder, single, _, _ = tiny
    out = tmp_path / "out"
    assert convert_weights.main(["--source", str(folder), "--output", str(out)]) == 0
    (out / "unet" / "notes.txt").write_text("mine")
    (out / "tokenizer" / "extra").mkdir()
    (out / "tokenizer" / "extra" / "vocab.bak").write_text("mine")
    capsys.readouterr()
    assert convert_weights.main(["--source", str(folder), "--output", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "would delete files a conversion did not write: tokenizer/extra/vocab.bak, unet/notes.txt" in err
    assert (out / "unet" / "notes.txt").read_text() == "mine"
    (out / "unet" / "notes.txt").unlink()
    shutil.rmtree(out / "tokenizer" / "extra")
    assert convert_weights.main(["--source", str(folder), "--output", str(out), "--overwrite"]) == 0

    inside = folder / "converted"
    assert convert_weights.main(["--source", str(folder), "--output", str(inside)]) == 1
    assert f"is inside the input folder {folder}" in capsys.readouterr().err and not inside.exists()

    (tmp_path / "file").write_text("")
    assert convert_weights.main(["--source", str(single), "--config", str(folder), "--output", str(tmp_path / "file" / "o")]) == 1
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_a_pickled_checkpoint_without_torch_names_the_extra(tiny, tmp_path, monkeypatch, capsys):
    _, _, _, models = tiny
    ckpt = write_ldm_file(tmp_path / "model.ckpt", ldm_state_dict(models))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as where it is not installed
    with pytest.raises(ConversionError, match=r'pickled PyTorch checkpoint: reading it needs PyTorch, from the "torch" extra'):
        load_torch_file(ckpt)
    assert convert_weights.main(["--source", str(ckpt), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert 'the "torch" extra (pip install -e ".[torch]"' in err and err.count("\n") == 1
