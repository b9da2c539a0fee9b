"""scripts/sample.py and scripts/edit.py end to end on a toy checkpoint, and their errors: bad settings and
outputs refused before any work; any prompt written; one output failing, or a kill, loses nothing else."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from psd_tools import PSDImage
from sampling_toy import SIZE, make_random_layerdiff
from script_support import load_script

from layerdiff_jax.data.layers import list_sample_folders, read_sample_folder
from layerdiff_jax.fileio import OutputFolderError, recorded_entries
from layerdiff_jax.sampling import outputs
from layerdiff_jax.sampling.outputs import CONTACT_SHEET, PSD_FILE, check_layered_files
from layerdiff_jax.sampling.sampler import LayerDiffPipeline

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"




sample_script, edit_script = load_script("sample"), load_script("edit")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Recording SIZE as its training resolution, so a run without --size compiles what the others do."""
    return make_random_layerdiff(tmp_path_factory.mktemp("toy_layerdiff"), trained_size=SIZE)


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
    assert _listing(run) == ["contact_sheet.png", "sample_0000", "sample_0001", "sample_0002"]
    assert recorded_entries(run) == set(_listing(run))
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

    usage_error(["--prompt", "a red circle"], "could not split this prompt: give the layers yourself")  # one object
    usage_error([], "give --prompt")
    usage_error(["--prompt", "a", "--layer-prompt", "b", "--steps", "0"], "--steps must be an integer >= 1, got 0")
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
    with pytest.raises(SystemExit) as exit_:
        edit_script.main(["restyle", *common, "--layer", "0", "--style", "striped", "--strength", "0"])
    assert exit_.value.code == 2 and "--strength must be a number in (0, 1], got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        edit_script.main(["inpaint", *common[:2], "--sample", str(tmp_path), "--layer", "1", "--prompt", "a", "--out", str(tmp_path / "o")])
    assert "not a layered sample folder" in capsys.readouterr().err


def _listing(folder):
    """The entries of an output folder, without its lock and record."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _spec(folder, requests):
    path = folder / "requests.json"
    path.write_text(json.dumps(requests, ensure_ascii=False), encoding="utf-8")
    return path


# Two requests, the larger with 3 layers, in batches of 2 at SIZE: the shapes the `run` fixture compiled.
UNICODE_REQUESTS = [
    {"prompt": "shapes ✨", "layer_prompts": ["a red circle 🔴"], "num_samples": 2},
    {"prompt": "二つの形", "layer_prompts": ["a green square", "a red circle 🔴"]},
]


def _sample(checkpoint, spec, out, *extra):
    return sample_script.main(["--checkpoint", str(checkpoint), "--spec", str(spec), "--steps", "2", "--batch-size", "2",
                               "--quiet", "--out", str(out), *extra])


def test_unicode_prompts_are_written_with_every_sample(run, checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    assert _sample(checkpoint, _spec(tmp_path, UNICODE_REQUESTS), out) == 0
    assert _listing(out) == [CONTACT_SHEET, "sample_0000", "sample_0001", "sample_0002"]
    psd = PSDImage.open(out / "sample_0002" / PSD_FILE)
    assert [layer.name for layer in psd] == ["background: the background", "layer 01: a green square", "layer 02: a red circle 🔴"]
    assert read_sample_folder(out / "sample_0002").global_prompt == "二つの形"
    err = capsys.readouterr().err
    assert "outside the tokenizer's vocabulary" in err and "'🔴'" in err and err.count("🔴") == 1  # warned once
    # No --size: the size the model records it was trained at, without a warning.
    assert all(read_sample_folder(p).size == (SIZE, SIZE) for p in out.glob("sample_*")) and "trained at" not in err


def test_an_output_that_fails_loses_no_other(run, checkpoint, tmp_path, monkeypatch, capsys):
    calls = []

    def psd_failing_once(sample, path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("simulated write failure")
        outputs.write_psd(sample, path)

    monkeypatch.setitem(outputs._WRITERS, "psd", (PSD_FILE, psd_failing_once))
    out = tmp_path / "samples"
    assert _sample(checkpoint, _spec(tmp_path, UNICODE_REQUESTS), out) == 1
    assert "sample_0000: written without layers.psd (OSError: simulated write failure)" in capsys.readouterr().err
    assert _listing(out) == [CONTACT_SHEET, "sample_0000", "sample_0001", "sample_0002"]
    assert not (out / "sample_0000" / PSD_FILE).exists() and (out / "sample_0001" / PSD_FILE).is_file()
    for folder in out.glob("sample_*"):
        read_sample_folder(folder)
        check_layered_files(folder)
    with pytest.raises(OutputFolderError, match="unfinished run of sample.py"):  # a sample lacks a file
        list_sample_folders(out)


def test_samples_are_written_as_each_batch_finishes(run, checkpoint, tmp_path, monkeypatch, capsys):
    """A run interrupted during its second batch (Ctrl-C) keeps the first batch, says so in one line, and
    the folder is marked as an unfinished run, which readers of sample folders refuse."""
    denoise, calls = LayerDiffPipeline.denoise, []

    def killed_in_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return denoise(self, *args, **kwargs)

    monkeypatch.setattr(LayerDiffPipeline, "denoise", killed_in_second_batch)
    out = tmp_path / "samples"
    assert _sample(checkpoint, _spec(tmp_path, UNICODE_REQUESTS), out, "--size", str(SIZE), str(SIZE)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sample.py: interrupted after 2 sample(s); {out} keeps them, marked as unfinished (rerun with --overwrite)"
    )
    assert _listing(out) == ["sample_0000", "sample_0001"]
    for folder in out.iterdir():
        if not folder.name.startswith("."):
            read_sample_folder(folder)
            check_layered_files(folder)
    with pytest.raises(OutputFolderError, match="unfinished run of sample.py"):
        list_sample_folders(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance", "nan"], "--guidance must be a finite number >= 0 (1 = no guidance), got nan"),
        (["--guidance", "inf"], "--guidance must be a finite number >= 0 (1 = no guidance), got inf"),
        (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--eta", "nan"], "--eta must be a number in [0, 1] (0 = deterministic DDIM), got nan"),
        (["--eta", "-2"], "--eta must be a number in [0, 1]"),
        (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    ],
)
def test_bad_settings_are_refused_before_loading(checkpoint, tmp_path, capsys, args, message):
    """sample.py and both edit.py commands refuse them alike (one check in the library), before loading."""
    sample = tmp_path / "s"
    sample.mkdir()
    (sample / "sample.json").write_text("{}")
    commands = {
        "sample": (sample_script, ["--checkpoint", str(checkpoint), "--prompt", "a", "--layer-prompt", "b"]),
        "inpaint": (edit_script, ["inpaint", "--checkpoint", str(checkpoint), "--sample", str(sample), "--layer", "1", "--prompt", "a"]),
        "restyle": (edit_script, ["restyle", "--checkpoint", str(checkpoint), "--sample", str(sample), "--layer", "1", "--style", "a"]),
    }
    for script, base in commands.values():
        with pytest.raises(SystemExit) as exit_:
            script.main([*base, *args, "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_made_is_refused_before_loading(checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for script, args in [
        (sample_script, ["--prompt", "a", "--layer-prompt", "b"]),
        (edit_script, ["inpaint", "--sample", str(tmp_path), "--layer", "1", "--prompt", "a"]),
    ]:
        if script is edit_script:
            (tmp_path / "sample.json").write_text("{}")
        with pytest.raises(SystemExit) as exit_:
            script.main([*args, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "file" / "out")])
        assert exit_.value.code == 2
        assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_run(run, checkpoint, tmp_path, capsys):
    """A rerun with fewer samples leaves none of the earlier run's behind (evaluate.py would score both), and a
    folder holding anything the tool did not write is refused, naming it, with nothing deleted."""
    out = tmp_path / "samples"
    shutil.copytree(run, out)
    one = [{"prompt": "a red circle on a blue background", "layer_prompts": ["a red circle"]}]
    assert _sample(checkpoint, _spec(tmp_path, one), out, "--size", str(SIZE), str(SIZE), "--overwrite") == 0
    assert _listing(out) == [CONTACT_SHEET, "sample_0000"] and len(list_sample_folders(out)) == 1
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        _sample(checkpoint, _spec(tmp_path, one), out, "--overwrite")
    assert exit_.value.code == 2 and "holds entries this tool did not write (notes.txt)" in capsys.readouterr().err
    assert _listing(out) == [CONTACT_SHEET, "notes.txt", "sample_0000"]


def test_edit_output_may_not_hold_the_source_the_model_or_foreign_files(run, checkpoint, tmp_path, capsys):
    """edit.py --overwrite pointed at the folder of the sample it edits, at the model, or at a folder of the
    user's files is refused before any work, and every file there is kept."""
    runs = tmp_path / "runs"
    shutil.copytree(run, runs)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"x")
    for out, message in [
        (runs, "it contains the input"),
        (runs / "sample_0000", "it is the input"),
        (runs / "sample_0000" / "edited", "it lies inside the input"),
        (checkpoint, "it is the input"),
        (mine, "holds entries this tool did not write (photo.png)"),
    ]:
        before = sorted(p.relative_to(out.parent) for p in out.parent.rglob("*"))
        with pytest.raises(SystemExit) as exit_:
            edit_script.main(["inpaint", "--checkpoint", str(checkpoint), "--sample", str(runs / "sample_0000"), "--layer", "1",
                              "--prompt", "a blue square", "--out", str(out), "--overwrite"])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
        assert sorted(p.relative_to(out.parent) for p in out.parent.rglob("*")) == before
    # An edit's own folder is replaced by --overwrite (its record lists the sample's files).
    out = tmp_path / "edited"
    args = ["restyle", "--checkpoint", str(checkpoint), "--sample", str(runs / "sample_0000"), "--layer", "0", "--style", "striped",
            "--steps", "4", "--strength", "0.5", "--out", str(out)]
    assert edit_script.main(args) == 0 and edit_script.main([*args, "--overwrite"]) == 0
    assert recorded_entries(out) == set(_listing(out)) and "sample.json" in _listing(out)
    assert read_sample_folder(out).metadata["edits"][0]["style"] == "striped"
