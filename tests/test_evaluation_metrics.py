"""FID (formula vs scipy, Inception vs torch-fidelity), CLIP score (vs a direct computation) and the CLI."""

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import flax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
from script_support import load_script

from layerdiff_jax.convert.core import ConversionError
from layerdiff_jax.data.layers import write_sample_folder
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.data.tokenizer import build_toy_tokenizer
from layerdiff_jax.evaluation.clip_score import ClipScorer
from layerdiff_jax.evaluation.fid import fid_from_features
from layerdiff_jax.evaluation.inception import (
    INPUT_SIZE,
    InceptionFeatures,
    InceptionV3FID,
    load_inception,
    resize_bilinear_tf1,
)
from layerdiff_jax.fileio import partial_path
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.sampling.outputs import write_sample

ROOT = Path(__file__).resolve().parents[1]


def _scipy_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("n1, n2, dim", [(500, 400, 16), (300, 300, 64), (40, 30, 64)])  # last: N < D
def test_frechet_distance_matches_scipy_sqrtm(n1, n2, dim):
    rng = np.random.default_rng(dim + n1)
    a = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim))
    b = 0.5 + rng.normal(size=(n2, dim)) @ rng.normal(size=(dim, dim))
    expected = _scipy_fid(a, b)
    assert expected > 1.0
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8 * expected)
    # Shifting both sets alike leaves it unchanged; shifting one adds |shift|^2.
    assert fid_from_features(a + 3.0, b + 3.0) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(a + 1.0, a) == pytest.approx(dim, rel=1e-6)


def test_fid_rejects_bad_features():
    features = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(np.zeros((1, 4)), features)
    with pytest.raises(ValueError, match="feature widths differ"):
        fid_from_features(features, features[:, :3])


def _random_inception_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """torch-fidelity-layout weights with He-scaled convs and batch norms near identity, so that
    activations keep their scale through the whole network."""
    target = abstract_params(InceptionV3FID(), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    rng = np.random.default_rng(seed)
    sd = {}
    for path, leaf in flax.traverse_util.flatten_dict(target).items():
        module, name = ".".join(path[:-1]), path[-1]
        if name == "kernel":
            h, w, i, o = leaf.shape
            value, key = rng.normal(0, np.sqrt(2 / (h * w * i)), (o, i, h, w)), "weight"
        elif name == "scale":
            value, key = rng.uniform(0.5, 1.5, leaf.shape), "weight"
            sd[f"{module}.num_batches_tracked"] = torch.tensor(0)
        elif name == "running_var":
            value, key = rng.uniform(0.5, 1.5, leaf.shape), name
        else:  # bias, running_mean
            value, key = rng.normal(0, 0.1, leaf.shape), name
        sd[f"{module}.{key}"] = torch.tensor(value, dtype=torch.float32)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # unused by FID
    return sd


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(_random_inception_state_dict(), path)
    return path


def _import_torch_fidelity(module, monkeypatch):
    """A torch-fidelity module, imported without the package __init__ (which needs torchvision)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("reference needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    return importlib.import_module(f"torch_fidelity.{module}")


@pytest.mark.parametrize("size", [(48, 80), (300, 310), (299, 299)])
def test_resize_matches_torch_fidelity_tf1_bilinear(size, monkeypatch):
    reference = _import_torch_fidelity("interpolate_compat_tensorflow", monkeypatch)
    images = np.random.default_rng(0).integers(0, 256, (2, *size, 3)).astype(np.float32)
    expected = reference.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(images).permute(0, 3, 1, 2), size=(INPUT_SIZE, INPUT_SIZE), align_corners=False
    ).permute(0, 2, 3, 1)
    got = np.asarray(resize_bilinear_tf1(jnp.asarray(images), INPUT_SIZE))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-3)


def test_inception_features_match_torch_fidelity(inception_file, monkeypatch):
    module = _import_torch_fidelity("feature_extractor_inceptionv3", monkeypatch)
    reference = module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file)
    )
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0].numpy()
    got = InceptionFeatures(load_inception(inception_file), batch_size=2)(list(images))
    assert got.shape == (2, 2048) and np.abs(expected).mean() > 0.5
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_inception_file_missing_a_key_names_it(inception_file, tmp_path):
    from safetensors.numpy import save_file

    sd = {k: v.numpy() for k, v in torch.load(inception_file, weights_only=True).items()}
    del sd["Mixed_6c.branch7x7_2.bn.running_var"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ConversionError, match="Mixed_6c/branch7x7_2/bn/running_var"):
        load_inception(tmp_path / "broken.safetensors")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_toy_tokenizer()
    tokenizer.save(folder)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_score_matches_a_direct_computation(clip_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    samples = [generate_sample(4, i, 48) for i in range(6)]
    images, prompts = [s.composite() for s in samples], [s.global_prompt for s in samples]
    got = ClipScorer(clip_dir, batch_size=4).scores(images, prompts)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    text = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), atol=1e-4)
    assert got.shape == (6,) and len(set(np.round(got, 4))) > 1


def _export(folder: Path, seed: int, num: int) -> Path:
    for i in range(num):  # what `build_dataset.py export` writes
        write_sample_folder(generate_sample(seed, i, 64), folder / f"sample_{i:05d}")
    return folder


def test_cli_without_weights_reports_what_it_skipped(tmp_path):
    samples = _export(tmp_path / "samples", seed=0, num=12)
    out = tmp_path / "metrics.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(samples), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "skipped FID: no Inception weights" in run.stdout and "skipped CLIP score: no CLIP checkpoint" in run.stdout
    metrics = json.loads(out.read_text())
    assert metrics["fid"]["status"] == "skipped" and metrics["clip_score"]["status"] == "skipped"
    overall = metrics["groups"]["overall"]
    assert overall["num_samples"] == 12 and overall["fid"] is None
    assert overall["layer_colour_accuracy"] == overall["background_colour_accuracy"] == 1.0
    assert overall["shape_accuracy"] >= 0.98
    counts = [k for k in metrics["groups"] if k != "overall"]
    assert set(counts) <= {"2", "3", "4"} and sum(metrics["groups"][k]["num_samples"] for k in counts) == 12
    first_cells = [line.split()[0] for line in run.stdout.splitlines()[2:] if line.strip()]
    rows = [cell for cell in first_cells if cell in {*counts, "overall"}]
    assert rows == [*counts, "overall"]
    assert len(metrics["samples"]) == 12 and metrics["samples"][0]["layers"][0]["clean"] is True


def _evaluate_main():
    return load_script("evaluate").main


def test_cli_with_weights_computes_fid_and_clip_score(tmp_path, inception_file, clip_dir, capsys):
    samples = _export(tmp_path / "samples", seed=1, num=10)
    out = tmp_path / "metrics.json"
    main = _evaluate_main()
    args = [str(samples), "--out", str(out), "--inception", str(inception_file), "--clip", str(clip_dir)]
    assert main([*args, "--reference", str(samples), "--batch-size", "2"]) == 0  # compiled by the test above
    printed = capsys.readouterr().out
    assert "skipped" not in printed
    metrics = json.loads(out.read_text())
    assert metrics["fid"]["status"] == "computed" and metrics["fid"]["reference_matched_by_layer_count"]
    # The samples against themselves: FID 0 in every group with two or more samples.
    for group, row in metrics["groups"].items():
        if row["num_samples"] >= 2:
            assert abs(row["fid"]) < 1e-6, (group, row["fid"])
        else:
            assert row["fid"] is None
    loaded = [generate_sample(1, i, 64) for i in range(10)]
    expected = ClipScorer(clip_dir).scores([s.composite() for s in loaded], [s.global_prompt for s in loaded])
    assert metrics["groups"]["overall"]["clip_score"] == pytest.approx(float(expected.mean()), abs=1e-4)

    # Missing weights are an error, not a silent skip.
    assert main([*args[:3], "--inception", str(tmp_path / "nope.pth"), "--reference", str(samples)]) == 1
    assert "--inception" in capsys.readouterr().err


def test_cli_refuses_incomplete_sample_folders(tmp_path, capsys):
    """A folder a kill cut short is refused by name; --skip-bad skips and lists it."""
    samples = tmp_path / "samples"
    for i in range(2):
        write_sample(generate_sample(0, i, 32), samples / f"sample_{i:04d}")
    # What a kill left with in-place writing: sample.json, a truncated layers.ora, no layers.psd.
    cut = samples / "sample_0001"
    (cut / "layers.psd").unlink()
    (cut / "layers.ora").write_bytes((cut / "layers.ora").read_bytes()[:200])
    # What a kill leaves now: a staging folder that was never renamed into place.
    shutil.copytree(samples / "sample_0000", partial_path(samples / "sample_0002"))
    evaluate = _evaluate_main()
    out = tmp_path / "metrics.json"
    assert evaluate([str(samples), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert ".sample_0002.partial: an incomplete sample folder" in err and "--skip-bad" in err and not out.exists()
    shutil.rmtree(partial_path(samples / "sample_0002"))
    assert evaluate([str(samples), "--out", str(out)]) == 1
    assert "sample_0001/layers.ora: not a readable OpenRaster file" in capsys.readouterr().err and not out.exists()

    shutil.copytree(samples / "sample_0000", partial_path(samples / "sample_0002"))
    assert evaluate([str(samples), "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "unreadable sample folders skipped: 2" in printed
    assert "sample_0001/layers.ora" in printed and ".sample_0002.partial" in printed
    assert json.loads(out.read_text())["groups"]["overall"]["num_samples"] == 1
