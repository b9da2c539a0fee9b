"""Prompt tokenizers: the toy word-level one and a CLIP tokenizer from local files, one interface."""

import json
import logging

import numpy as np
import pytest
from transformers import CLIPTokenizer

from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.data.tokenizer import MAX_LENGTH, build_toy_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def toy():
    return load_tokenizer("toy")


def test_toy_ids_layout(toy):
    ids = toy(["A red circle, on the background", ""])
    hf = toy.hf_tokenizer
    assert ids.shape == (2, MAX_LENGTH) and ids.dtype == np.int32
    words = ["a", "red", "circle", ",", "on", "the", "background"]
    expected = [hf.bos_token_id, *hf.convert_tokens_to_ids(words), hf.eos_token_id]
    assert ids[0, :9].tolist() == expected and (ids[0, 9:] == toy.pad_id).all()
    assert ids[1, :2].tolist() == [hf.bos_token_id, hf.eos_token_id] and (ids[1, 2:] == toy.pad_id).all()
    assert toy(["a zebra"])[0, 2] == hf.unk_token_id
    assert toy.vocab_size == len(set(hf.get_vocab().values()))


def test_toy_covers_every_synthetic_prompt(toy):
    prompts = [p for i in range(40) for s in [generate_sample(0, i, 32)] for p in [s.global_prompt, *s.layer_prompts]]
    assert (toy(prompts) != toy.hf_tokenizer.unk_token_id).all()


def test_toy_save_and_reload(toy, tmp_path):
    toy.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    prompts = ["a blue square and a red circle on a white striped background", ""]
    np.testing.assert_array_equal(again(prompts), toy(prompts))
    assert again.vocab_size == toy.vocab_size


def test_long_prompt_is_truncated_with_a_warning(toy, caplog):
    tok = build_toy_tokenizer(max_length=8)
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax.data.tokenizer"):
        ids = tok(["a red circle and a red circle and a red circle", "a red circle"])
    assert "truncated" in caplog.text
    hf = tok.hf_tokenizer
    assert ids.shape == (2, 8) and ids[0, 0] == hf.bos_token_id and ids[0, -1] == hf.eos_token_id
    assert ids[0, 1:7].tolist() == hf.convert_tokens_to_ids(["a", "red", "circle", "and", "a", "red"])
    with pytest.raises(TypeError, match="sequence of prompts"):
        tok("a red circle")


def _write_tiny_clip_tokenizer(folder):
    """A CLIP BPE vocabulary for a few words, written by hand (no download)."""
    folder.mkdir(parents=True)
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "o n</w>", "t h", "th e</w>",
              "b a", "ba c", "bac k", "back g", "backg r", "backgr o", "backgro u", "backgrou n", "backgroun d</w>"]  # fmt: skip
    chars = list("abcdeghiklnoprstuwy")
    merged = [m.replace(" ", "") for m in merges]
    vocab = chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_clip_tokenizer_from_an_sd_folder(tmp_path):
    _write_tiny_clip_tokenizer(tmp_path / "sd" / "tokenizer")
    tok = load_tokenizer(tmp_path / "sd")
    assert isinstance(tok.hf_tokenizer, CLIPTokenizer)
    reference = CLIPTokenizer.from_pretrained(str(tmp_path / "sd" / "tokenizer"))
    prompts = ["a red circle on the background", ""]
    expected = reference(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"]
    np.testing.assert_array_equal(tok(prompts), np.asarray(expected))
    vocab = reference.get_vocab()
    assert tok(prompts)[0, :8].tolist() == [vocab[w] for w in ["<|startoftext|>", "a</w>", "red</w>", "circle</w>",
                                                               "on</w>", "the</w>", "background</w>", "<|endoftext|>"]]  # fmt: skip
    # Same interface as the toy tokenizer, including truncation that keeps the closing EOS.
    short = load_tokenizer(tmp_path / "sd" / "tokenizer", max_length=4)
    ids = short(["a red circle on the background"])
    assert ids.tolist() == [[vocab["<|startoftext|>"], vocab["a</w>"], vocab["red</w>"], vocab["<|endoftext|>"]]]


def test_unknown_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path)


def test_words_outside_the_vocabulary_are_named_once(caplog):
    tok = build_toy_tokenizer()
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax.data.tokenizer"):
        ids = tok(["a red zebra 🔴", "a red zebra", "a blue circle"])
        tok(["a zebra", "a quokka"])
    unk = tok.hf_tokenizer.unk_token_id
    assert ids[0].tolist().count(unk) == 2 and ids[2].tolist().count(unk) == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "word(s) outside the tokenizer's vocabulary, read as <unk>: 'zebra', '🔴'",
        "word(s) outside the tokenizer's vocabulary, read as <unk>: 'quokka'",
    ]


def test_a_long_prompt_is_warned_about_once_and_shortened(caplog):
    tok = build_toy_tokenizer(max_length=8)
    long = "a red circle and " * 20
    with caplog.at_level(logging.WARNING):
        tok([long, long, "a red circle"])
        tok([long])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("1 prompt(s) longer than 8 tokens truncated: 'a red circle and a red")
    assert warnings[0].endswith("...' (82 tokens)")  # 80 words + BOS + EOS, the prompt cut to 60 characters
