"""scripts/sample.py and scripts/edit.py end to end on a toy checkpoint, and their errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from layerdiff_jax.data.layers import read_sample_folder
from sampling_toy import SIZE, make_random_layerdiff

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample_script, edit_script = load_script("sample"), load_script("edit")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_layerdiff(tmp_path_factory.mktemp("toy_layerdiff"))


@pytest.fixture(scope="module")
def run(checkpoint, tmp_path_factory):
    """A --spec run: 3 samples of 2 requests with different layer counts, in batches of 2."""
    out = tmp_path_factory.mktemp("run") / "samples"
    spec = out.parent / "requests.json"
    spec.write_text(json.dumps([
        {"prompt": "a red circle on a blue background", "layer_prompts": ["a red circle"], "num_samples": 2},
        {"prompt": "a green square and a red circle", "layer_prompts": ["a green square", "a red circle"],
         "background_prompt": "a striped background", "seed": 42},
    ]))
    args = ["--checkpoint", str(checkpoint), "--spec", str(spec), "--steps", "2", "--size", str(SIZE), str(SIZE),
            "--batch-size", "2", "--seed", "7", "--quiet", "--out", str(out)]
    assert sample_script.main(args) == 0
    return out


def test_sample_cli_writes_exchange_folders_layered_files_and_contact_sheet(run, checkpoint):
    assert sorted(p.name for p in run.iterdir()) == ["contact_sheet.png", "sample_0000", "sample_0001", "sample_0002"]
    samples = [read_sample_folder(run / f"sample_{i:04d}") for i in range(3)]
    assert [s.num_layers for s in samples] == [2, 2, 3]
    assert samples[2].layer_prompts == ["a striped background", "a green square", "a red circle"]
    assert [s.metadata["seed"] for s in samples] == [7, 8, 42]
    for s in samples:
        assert s.metadata | {"seed": 0} == {"seed": 0, "steps": 2, "guidance": 3.0, "eta": 0.0, "checkpoint": str(checkpoint)}
        assert s.size == (SIZE, SIZE)
    assert not np.array_equal(samples[0].background, samples[1].background)  # seeds 7 and 8
    for i in range(3):
        assert (run / f"sample_{i:04d}" / "layers.ora").is_file() and (run / f"sample_{i:04d}" / "layers.psd").is_file()


def test_edit_cli_inpaints_a_generated_sample(run, checkpoint, tmp_path):
    source = run / "sample_0002"
    out = tmp_path / "inpainted"
    args = ["inpaint", "--checkpoint", str(checkpoint), "--sample", str(source), "--layer", "1",
            "--prompt", "a blue triangle", "--steps", "2", "--out", str(out)]
    assert edit_script.main(args) == 0
    before, after = read_sample_folder(source), read_sample_folder(out)
    assert after.layer_prompts == ["a striped background", "a blue triangle", "a red circle"]
    for name in ("background.png", "layer_02.png", "mask_02.png"):  # non-target files byte-identical
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not np.array_equal(after.foregrounds[0], before.foregrounds[0])
    assert after.metadata["edits"][0]["edit"] == "inpaint" and (out / "layers.psd").is_file()


def test_sample_cli_errors(checkpoint, tmp_path, capsys):
    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--quiet"]

    def usage_error(args, message):
        with pytest.raises(SystemExit) as e:
            sample_script.main(base + args)
        assert e.value.code == 2
        assert message in capsys.readouterr().err

    usage_error(["--prompt", "a red circle"], "no layer prompt")
    usage_error([], "give --prompt")
    usage_error(["--prompt", "a", "--layer-prompt", "b", "--steps", "0"], "--steps must be >= 1")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit):
        sample_script.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "full"), "--prompt", "a", "--layer-prompt", "b"])
    assert "not an empty folder" in capsys.readouterr().err

    many = ["--prompt", "shapes", "--layer-prompt", "a red circle", "--layer-prompt", "a blue square", "--layer-prompt", "a green triangle"]
    assert sample_script.main(base + many) == 1
    assert "asks for 4 layers" in capsys.readouterr().err and not (tmp_path / "out").exists()
    bad = ["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--prompt", "a", "--layer-prompt", "b"]
    assert sample_script.main(bad) == 1
    assert "checkpoint" in capsys.readouterr().err


def test_edit_cli_errors(run, checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(checkpoint), "--sample", str(run / "sample_0000"), "--out", str(tmp_path / "o")]
    assert edit_script.main(["restyle", *common, "--layer", "5", "--style", "striped"]) == 1
    assert "target layer 5 does not exist" in capsys.readouterr().err
    assert edit_script.main(["restyle", *common, "--layer", "0", "--style", "striped", "--strength", "0"]) == 1
    assert "strength" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        edit_script.main(["inpaint", *common[:2], "--sample", str(tmp_path), "--layer", "1", "--prompt", "a", "--out", str(tmp_path / "o")])
    assert "not a layered sample folder" in capsys.readouterr().err
