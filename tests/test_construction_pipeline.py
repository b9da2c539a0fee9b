"""Data construction runs without weights: oracle mode on synthetic samples, rejection, resume,
unreadable images, failing stages, the rule functions the run decides with, and the CLI."""

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from script_support import load_script

from layerdiff_jax.construction import run
from layerdiff_jax.construction.config import ConstructionConfig, Rules
from layerdiff_jax.construction.oracle import OracleCaptioner, oracle_stages
from layerdiff_jax.construction.run import construct, image_key, image_source, oracle_source
from layerdiff_jax.data.layers import dilate_mask, list_sample_folders, read_sample_folder, write_sample_folder
from layerdiff_jax.data.synthetic import background_prompt, generate_sample, global_prompt
from layerdiff_jax.data.tfds_builders import build_from_folders, split_sizes
from layerdiff_jax.fileio import LOCK_FILE

RES = 48
CONFIG = ConstructionConfig(batch_size=3)




def _export(folder: Path, count: int) -> list:
    """Synthetic samples whose captions name the objects in a shuffled order, so that the caption's
    order is not the layer order: only depth can recover it."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        s = generate_sample(11, i, RES)
        shuffled = list(rng.permutation(s.layer_prompts[1:]))
        bg = s.metadata["background"]
        s.global_prompt = global_prompt(shuffled, background_prompt(bg["colour"], bg["pattern"]))
        write_sample_folder(s, folder / f"s{i:02d}")
        samples.append(s)
    return samples


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def _run(images, out):
    source, truth = oracle_source(images)
    return construct(source, out, oracle_stages(truth), CONFIG, progress=False)


def test_oracle_mode_recovers_the_ground_truth_layers(tmp_path):
    truth = _export(tmp_path / "in", 9)
    assert any(s.global_prompt.split(" on ")[0] != " and ".join(s.layer_prompts[1:]) for s in truth)
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert summary["samples_out"] == 9 and summary["rejected"] == 0
    assert summary["layers_per_sample"] == {
        str(n): sum(s.num_layers == n for s in truth) for n in sorted({s.num_layers for s in truth})
    }
    for i, want in enumerate(truth):
        got = read_sample_folder(tmp_path / "out" / f"s{i:02d}")
        assert got.layer_prompts[1:] == want.layer_prompts[1:]  # the ground-truth order, deepest first
        for m_got, m_want in zip(got.masks > 0, want.masks > 0):
            assert _iou(m_got, m_want) >= 0.95
        np.testing.assert_array_equal(got.foregrounds, want.foregrounds)
        hole = dilate_mask(want.masks.max(0)) > 0
        filled = got.background[hole].astype(int)
        assert np.abs(filled - want.background[hole]).mean() < 2  # the hole is filled with the background
        assert got.global_prompt == want.global_prompt and got.layer_prompts[0] == "the background"
    dataset, skipped = build_from_folders(tmp_path / "out", tmp_path / "tfds")
    assert skipped == [] and split_sizes(dataset) == {"train": 9}


class _KeepHole:
    """An inpainter that leaves the objects where they were."""

    def inpaint(self, frames, holes, negative_prompts):
        return [f.image for f in frames]


def test_inpainting_that_keeps_an_object_is_rejected(tmp_path):
    _export(tmp_path / "in", 3)
    source, truth = oracle_source(tmp_path / "in")
    stages = dataclasses.replace(oracle_stages(truth), inpainter=_KeepHole())
    summary = construct(source, tmp_path / "out", stages, CONFIG, progress=False)
    assert summary["rejections"] == {"inpainting_keeps_object": 3} and summary["samples_out"] == 0
    assert list_sample_folders(tmp_path / "out") == []
    lines = [json.loads(line) for line in (tmp_path / "out" / "rejections.jsonl").read_text().splitlines()]
    assert [line["reason"] for line in lines] == ["inpainting_keeps_object"] * 3
    assert "of the inpainted region is salient" in lines[0]["detail"]


def test_background_phrases_missing_objects_and_unsalient_masks_are_rejected(tmp_path):
    samples = _export(tmp_path / "in", 3)
    source, truth = oracle_source(tmp_path / "in")
    captions = {"s00": "the lighting on a white background", "s01": samples[1].layer_prompts[1], "s02": "a unicorn"}

    class Caption:
        def caption(self, frames):
            return [captions[f.key] for f in frames]

    class NothingSalient:
        def saliency(self, frames):
            return [np.zeros(f.image.shape[:2], np.float32) for f in frames]

    stages = dataclasses.replace(oracle_stages(truth), captioner=Caption(), saliency=NothingSalient())
    summary = construct(source, tmp_path / "out", stages, CONFIG, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "rejections.jsonl").read_text().splitlines()]
    assert {line["key"]: line["reason"] for line in lines} == {
        "s00": "no_phrases",
        "s01": "no_salient_masks",
        "s02": "no_detections",
    }
    assert summary["rejections"] == {"no_detections": 1, "no_phrases": 1, "no_salient_masks": 1}


class _Counting:
    """Wraps the oracle captioner: counts captioned images, optionally interrupts on a given call."""

    def __init__(self, inner, interrupt_on_call=None):
        self.inner, self.interrupt_on_call = inner, interrupt_on_call
        self.calls, self.keys = 0, []

    def caption(self, frames):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        self.keys += [f.key for f in frames]
        return self.inner.caption(frames)


def test_resume_after_an_interruption_redoes_nothing(tmp_path):
    _export(tmp_path / "in", 7)
    source, truth = oracle_source(tmp_path / "in")
    stages = oracle_stages(truth)
    first = _Counting(OracleCaptioner(truth), interrupt_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        construct(source, tmp_path / "out", dataclasses.replace(stages, captioner=first), CONFIG, progress=False)
    done = sorted(p.name for p in list_sample_folders(tmp_path / "out"))
    assert done == ["s00", "s01", "s02"]  # the first batch was written before the interruption

    second = _Counting(OracleCaptioner(truth))
    summary = construct(source, tmp_path / "out", dataclasses.replace(stages, captioner=second), CONFIG, progress=False)
    assert sorted(second.keys) == [f"s{i:02d}" for i in range(3, 7)]
    assert summary["samples_out"] == 7
    assert summary["this_run"]["processed"] == 4 and summary["this_run"]["already_done"] == 3

    # A lost marker: only that image is redone; a finished run redoes nothing.
    (tmp_path / "out" / ".construction" / "status" / "s05.json").unlink()
    third = _Counting(OracleCaptioner(truth))
    construct(source, tmp_path / "out", dataclasses.replace(stages, captioner=third), CONFIG, progress=False)
    assert third.keys == ["s05"]
    fourth = _Counting(OracleCaptioner(truth))
    summary = construct(source, tmp_path / "out", dataclasses.replace(stages, captioner=fourth), CONFIG, progress=False)
    assert fourth.calls == 0 and summary["samples_out"] == 7 and summary["this_run"]["processed"] == 0


def test_unreadable_images_are_skipped_with_their_reason(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b c.jpg"):
        PIL.Image.fromarray(generate_sample(0, 1, 32).composite()).save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image")
    source = image_source(images, max_side=16)
    assert sorted(source.names.values()) == ["a.png", "broken.png", "empty.jpg", "sub/b c.jpg"]
    assert source.load(image_key("sub/b c.jpg")).shape == (16, 16, 3)  # downscaled to max_side

    class Nothing:  # every readable image goes through the stages and finds no object phrase
        def caption(self, frames):
            return ["the sky"] * len(frames)

    stages = dataclasses.replace(oracle_stages(truth=None), captioner=Nothing())  # nothing reaches the truth
    summary = construct(source, tmp_path / "out", stages, CONFIG, progress=False, workers=1)
    assert summary["images_in"] == 4 and summary["rejections"] == {"no_phrases": 2, "unreadable_image": 2}
    lines = [json.loads(line) for line in (tmp_path / "out" / "rejections.jsonl").read_text().splitlines()]
    reasons = {line["image"]: line["reason"] for line in lines}
    assert reasons == {
        "a.png": "no_phrases",
        "broken.png": "unreadable_image",
        "empty.jpg": "unreadable_image",
        "sub/b c.jpg": "no_phrases",
    }
    assert "broken.png: not a readable image" in next(line["detail"] for line in lines if line["image"] == "broken.png")


def test_a_failing_stage_rejects_only_its_image(tmp_path):
    _export(tmp_path / "in", 3)
    source, truth = oracle_source(tmp_path / "in")
    stages = oracle_stages(truth)

    class FailsOnS01:
        def depth(self, frames):
            if any(f.key == "s01" for f in frames):
                raise RuntimeError("CUDA out of memory (pretend)")
            return stages.depth.depth(frames)

    summary = construct(
        source, tmp_path / "out", dataclasses.replace(stages, depth=FailsOnS01()), CONFIG, progress=False
    )
    assert summary["samples_out"] == 2 and summary["rejections"] == {"stage_error": 1}
    line = json.loads((tmp_path / "out" / "rejections.jsonl").read_text())
    assert line["key"] == "s01" and line["detail"] == "depth: RuntimeError: CUDA out of memory (pretend)"

    class WrongShape:
        def saliency(self, frames):
            return [np.zeros((2, 2)) for _ in frames]

    summary = construct(
        source, tmp_path / "out2", dataclasses.replace(stages, saliency=WrongShape()), CONFIG, progress=False
    )
    assert summary["rejections"] == {"stage_error": 3}
    assert "saliency returned shape (2, 2)" in (tmp_path / "out2" / "rejections.jsonl").read_text()


def test_rules_come_from_the_config(tmp_path):
    _export(tmp_path / "in", 4)
    source, truth = oracle_source(tmp_path / "in")
    config = dataclasses.replace(CONFIG, rules=Rules(max_foregrounds=1, background_prompt="a background"))
    construct(source, tmp_path / "out", oracle_stages(truth), config, progress=False)
    for folder in list_sample_folders(tmp_path / "out"):
        sample = read_sample_folder(folder)
        assert sample.num_layers == 2 and sample.layer_prompts[0] == "a background"


# Each decision of the run and the function of `rules` that makes it, replaced by one that rejects everything.
REJECTING_RULES = {
    "filter_phrases": (lambda phrases, stop_words: [], "no_phrases"),
    "dedupe_detections": (lambda detections, iou_threshold: [], "no_detections"),
    "keep_salient": (lambda masks, salient, min_overlap: np.zeros(len(masks), bool), "no_salient_masks"),
    "inpainting_keeps_object": (lambda salient, hole, max_fraction: True, "inpainting_keeps_object"),
}


@pytest.mark.parametrize("rule", sorted(REJECTING_RULES))
def test_the_run_decides_with_the_rule_functions(tmp_path, monkeypatch, rule):
    """So that the rule tests test what runs: the run calls `rules`' functions instead of restating them."""
    _export(tmp_path / "in", 2)
    replacement, reason = REJECTING_RULES[rule]
    monkeypatch.setattr(run, rule, replacement)
    assert _run(tmp_path / "in", tmp_path / "out")["rejections"] == {reason: 2}


def test_the_run_orders_layers_with_the_rule_functions(tmp_path, monkeypatch):
    _export(tmp_path / "in", 2)
    called = set()

    def spy(name, rule):
        def call(*args):
            called.add(name)
            return rule(*args)

        return call

    names = {"mean_depths", "depth_order", "resolve_overlaps"}
    for name in names:
        monkeypatch.setattr(run, name, spy(name, getattr(run, name)))
    assert _run(tmp_path / "in", tmp_path / "out")["samples_out"] == 2
    assert called == names


def test_cli_oracle_run(tmp_path, capsys):
    _export(tmp_path / "in", 2)
    main = load_script("construct_layers").main
    assert main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--oracle", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["samples_out"] == 2
    assert main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    assert "--models is required" in capsys.readouterr().err
    assert main(["--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--oracle"]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err
    assert main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "in" / "out"), "--oracle"]) == 2
    assert "--out must not be inside --images" in capsys.readouterr().err
    # A second run on an --out that a live run holds is refused, naming it.
    (tmp_path / "busy").mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "tool": "construct_layers.py", "since": "now"}
    (tmp_path / "busy" / LOCK_FILE).write_text(json.dumps(holder))
    assert main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "busy"), "--oracle", "--no-progress"]) == 2
    assert f"in use by construct_layers.py (PID {os.getppid()}" in capsys.readouterr().err
