"""Data construction, the parts that are ours: phrases, the rules, the classical inpainter, the config,
and how the construction modules import each other."""

import ast
import graphlib
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from layerdiff_jax.construction import rules
from layerdiff_jax.construction.classical import best_shifts, shift_fill
from layerdiff_jax.construction.config import Rules, load_config
from layerdiff_jax.construction.errors import ConstructionConfigError
from layerdiff_jax.construction.phrases import HeuristicPhraseExtractor, SpacyPhraseExtractor, make_phrase_extractor
from layerdiff_jax.construction.stages import Detection
from layerdiff_jax.data.layers import dilate_mask
from layerdiff_jax.data.synthetic import generate_sample


@pytest.mark.parametrize(
    "caption, phrases",
    [
        (
            "a red circle, a blue square and a green triangle on a white striped background",
            ["a red circle", "a blue square", "a green triangle", "a white striped background"],
        ),
        ("a man riding a horse on the beach", ["a man", "a horse", "the beach"]),
        ("two dogs playing in the snow.", ["two dogs", "the snow"]),
        ("a woman holding an umbrella next to a tall building", ["a woman", "an umbrella", "a tall building"]),
        ("dogs sitting on a sofa", ["dogs", "a sofa"]),
    ],
)
def test_heuristic_phrases(caption, phrases):
    assert HeuristicPhraseExtractor().extract(caption) == phrases


def test_filter_phrases_drops_background_words_pronouns_and_repeats():
    phrases = [
        "the lighting",
        "a white background",
        "A dog",
        "it",
        "a dog",
        "stone walls",
        "a traffic  light",
        "the sky",
    ]
    assert rules.filter_phrases(phrases) == ["A dog", "a traffic light"]
    assert rules.filter_phrases(["a dog", "a red ball"], stop_words={"ball"}) == ["a dog"]
    assert Rules(extra_stop_words=("Ball",)).stop_words >= {"ball", "background"}


def test_spacy_extractor_and_documented_fallback(monkeypatch, caplog):
    chunk = types.SimpleNamespace
    fake = types.ModuleType("spacy")
    fake.load = lambda name: (
        (lambda text: chunk(noun_chunks=[chunk(text=w) for w in text.split("|")]))
        if name == "en_test"
        else (_ for _ in ()).throw(OSError(f"[E050] Can't find model '{name}'"))
    )
    monkeypatch.setitem(sys.modules, "spacy", fake)
    extractor = make_phrase_extractor("en_test")
    assert isinstance(extractor, SpacyPhraseExtractor) and extractor.extract("a cat|the mat") == ["a cat", "the mat"]
    with caplog.at_level(logging.WARNING):
        assert isinstance(make_phrase_extractor("en_missing"), HeuristicPhraseExtractor)
    assert "cannot load 'en_missing'" in caplog.text
    monkeypatch.setitem(sys.modules, "spacy", None)  # import fails
    with caplog.at_level(logging.WARNING):
        assert isinstance(make_phrase_extractor("en_test"), HeuristicPhraseExtractor)
    assert "spaCy is not installed" in caplog.text
    assert isinstance(make_phrase_extractor(None), HeuristicPhraseExtractor)


def test_saliency_overlap_rule_is_strictly_above_ten_percent():
    salient = np.zeros((10, 10), bool)
    salient[:, :1] = True  # column 0
    masks = np.zeros((4, 10, 10), bool)
    masks[0] = True  # 10 of 100 salient: exactly 10%, dropped
    masks[1, :, :9] = True  # 10 of 90: 11%, kept
    masks[2, :, 5:] = True  # none salient
    np.testing.assert_allclose(rules.saliency_overlap(masks, salient), [0.1, 10 / 90, 0.0, 0.0])
    assert rules.keep_salient(masks, salient).tolist() == [False, True, False, False]  # empty mask 3: overlap 0
    assert rules.keep_salient(masks, salient, min_overlap=0.0).tolist() == [True, True, False, False]


def test_depth_order_is_deepest_first_by_mean_depth():
    depth = np.tile(np.arange(8, dtype=np.float32), (8, 1))  # farther to the right
    masks = np.zeros((4, 8, 8), bool)
    masks[0, :, 2:4] = True  # mean 2.5
    masks[1, :, 6:] = True  # mean 6.5, deepest
    masks[2, :2, 0] = True
    masks[2, :2, 7] = True  # mean 3.5: a mean, not a max or a centre
    masks[3, :, 3:5] = True  # mean 3.5 too: ties keep their order
    np.testing.assert_allclose(rules.mean_depths(masks, depth), [2.5, 6.5, 3.5, 3.5])
    assert rules.depth_order(masks, depth).tolist() == [1, 2, 3, 0]


def test_overlaps_go_to_the_front_layer():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :3, :3] = True  # deepest
    masks[1, 1:, 1:] = True
    masks[2, 2, 2] = True  # front
    out = rules.resolve_overlaps(masks)
    assert out.sum(0).max() == 1 and (out.any(0) == masks.any(0)).all()
    assert out[2, 2, 2] and not out[1, 2, 2] and not out[0, 1, 1] and out[1, 1, 1] and out[0, 0, 0]


def test_dedupe_keeps_the_best_scoring_box_per_object():
    dets = [
        Detection("a puppy", (0, 0, 10, 10), 0.5),
        Detection("a dog", (1, 0, 10, 10), 0.9),
        Detection("a ball", (20, 20, 30, 30), 0.7),
        Detection("a line", (5, 5, 5, 9), 0.99),  # empty box
    ]
    assert [d.phrase for d in rules.dedupe_detections(dets, 0.5)] == ["a dog", "a ball"]
    assert [d.phrase for d in rules.dedupe_detections(dets, 0.95)] == ["a dog", "a ball", "a puppy"]  # IoU 0.9


def test_rejection_rule_counts_salient_pixels_inside_the_hole_only():
    hole = np.zeros((10, 10), bool)
    hole[:5] = True
    salient = np.zeros((10, 10), bool)
    salient[5:] = True  # salient, but outside the hole
    assert not rules.inpainting_keeps_object(salient, hole, 0.1)
    salient[:1] = True  # 10 of 50 hole pixels
    assert rules.inpainting_keeps_object(salient, hole, 0.1)
    assert not rules.inpainting_keeps_object(salient, hole, 0.2)
    assert not rules.inpainting_keeps_object(salient, np.zeros_like(hole), 0.0)


def test_dilation_is_a_5x5_square():
    mask = np.zeros((9, 9), np.uint8)
    mask[4, 4] = 255
    dilated = dilate_mask(mask)
    assert (dilated[2:7, 2:7] == 255).all() and dilated.sum() == 25 * 255


@pytest.mark.parametrize("index", range(6))
def test_shift_fill_restores_synthetic_backgrounds(index):
    sample = generate_sample(3, index, 48)
    hole = dilate_mask(sample.masks.max(0)) > 0
    image = sample.composite()
    filled = shift_fill(image, hole)
    np.testing.assert_array_equal(filled, sample.background)


def test_shift_fill_finds_the_period_and_falls_back_to_diffusion():
    y, x = np.mgrid[0:32, 0:32]
    checks = np.where(((y // 4 + x // 4) % 2)[..., None] == 1, 200, 50).astype(np.uint8).repeat(3, -1)
    hole = np.zeros((32, 32), bool)
    hole[8:20, 10:22] = True
    assert best_shifts(checks, ~hole, 16, 1)[0] in [(4, 4), (-4, 4), (0, 8), (8, 0)]
    np.testing.assert_array_equal(shift_fill(checks, hole), checks)
    # A smooth ramp repeats under no shift exactly; every hole pixel still gets a value between its neighbours'.
    ramp = (x * 8).astype(np.uint8)[..., None].repeat(3, -1)
    filled = shift_fill(ramp, hole, num_shifts=0)  # diffusion only
    assert (filled[~hole] == ramp[~hole]).all()
    assert filled[hole].min() >= ramp[hole].min() - 8 and filled[hole].max() <= ramp[hole].max() + 8


def test_config_defaults_relative_paths_and_errors(tmp_path):
    assert load_config(None).rules == Rules()
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump({"batch_size": 4, "rules": {"min_saliency_overlap": 0.2}, "detector": {"path": "owl"}})
    )
    config = load_config(path)
    assert config.batch_size == 4 and config.rules.min_saliency_overlap == 0.2
    assert config.models["detector"]["path"] == str((tmp_path / "owl").resolve())
    for bad, message in [
        ({"batchsize": 4}, r"unknown key\(s\) \['batchsize'\]"),
        ({"rules": {"min_overlap": 0.1}}, "bad rules section"),
        ({"rules": {"min_saliency_overlap": 10}}, r"rules.min_saliency_overlap must be a number in \[0, 1\]"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"phrases": {"model": "x"}}, r"phrases.\['model'\]"),
        ({"detector": "owl"}, "detector must be a mapping"),
    ]:
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConstructionConfigError, match=message):
            load_config(path)
    path.write_text("a: [")
    with pytest.raises(ConstructionConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConstructionConfigError, match="models file not found"):
        load_config(tmp_path / "none.yaml")


def test_construction_modules_import_each_other_without_cycles():
    """Every import between construction modules, the ones inside functions too, points one way."""
    package = Path(__file__).resolve().parents[1] / "layerdiff_jax" / "construction"
    modules = {path.stem for path in package.glob("*.py")}
    graph = {}
    for module in modules:
        imported = set()
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from package import module` too
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {name.rsplit(".", 1)[-1] for name in imported if name.startswith("layerdiff_jax.construction.")}
        graph[module] &= modules
    assert graph["config"].isdisjoint({"build", "hf_models"})  # a YAML is read without building stages
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
