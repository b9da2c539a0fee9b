"""Prompt tokenizers behind one interface: SD's CLIP tokenizer, or a word-level toy one for CPU work.

Both give `(N, max_length)` int32 ids: BOS, tokens, EOS, then padding. A prompt longer than
`max_length` tokens keeps its first `max_length - 1` tokens plus the final EOS, and a warning is
logged (as SD pipelines do).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerFast

from layerdiff_jax.data.synthetic import PALETTE, PATTERNS, SHAPES

log = logging.getLogger(__name__)

MAX_LENGTH = 77
TOY = "toy"
TOY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")  # pad, unk, bos, eos
# Words of the synthetic prompts, SD's default background prompt and layer-aware negatives.
TOY_WORDS = (
    ("a", "an", "the", "and", "on", "of", "with", "in", ",", ".", "background", "foreground", "layer", "image")
    + tuple(PALETTE)
    + SHAPES
    + PATTERNS
)


class PromptTokenizer:
    """Wraps a transformers tokenizer; `tokenizer(texts)` -> (N, max_length) int32 ids."""

    def __init__(self, hf_tokenizer, max_length: int = MAX_LENGTH):
        if hf_tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(hf_tokenizer).__name__} has no pad token")
        self.hf_tokenizer = hf_tokenizer
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def pad_id(self) -> int:
        return self.hf_tokenizer.pad_token_id

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("PromptTokenizer takes a sequence of prompts, not a single string")
        out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        for row, (text, ids) in enumerate(zip(texts, self.hf_tokenizer(list(texts))["input_ids"])):
            if len(ids) > self.max_length:
                log.warning("prompt truncated to %d tokens: %r", self.max_length, text)
                ids = ids[: self.max_length - 1] + ids[-1:]  # keep the closing EOS
            out[row, : len(ids)] = ids
        return out

    def save(self, folder: str | os.PathLike) -> None:
        """Saves the tokenizer files so that `load_tokenizer(folder)` gives it back."""
        self.hf_tokenizer.save_pretrained(os.fspath(folder))


def build_toy_tokenizer(max_length: int = MAX_LENGTH) -> PromptTokenizer:
    """A lower-casing WordLevel tokenizer over the synthetic vocabulary, built in code."""
    pad, unk, bos, eos = TOY_SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate(TOY_SPECIAL_TOKENS + TOY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # also splits off "," and "."
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, model_max_length=max_length
    )
    return PromptTokenizer(hf, max_length)


def load_tokenizer(spec: str | os.PathLike, max_length: int = MAX_LENGTH) -> PromptTokenizer:
    """`"toy"`, or a folder: an SD model folder (uses its `tokenizer/`), a CLIP tokenizer folder
    (`vocab.json` + `merges.txt`) or a folder written by `PromptTokenizer.save` (`tokenizer.json`)."""
    if os.fspath(spec) == TOY:
        return build_toy_tokenizer(max_length)
    folder = Path(spec)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return PromptTokenizer(CLIPTokenizer.from_pretrained(os.fspath(folder)), max_length)
    if (folder / "tokenizer.json").is_file():
        return PromptTokenizer(AutoTokenizer.from_pretrained(os.fspath(folder)), max_length)
    raise FileNotFoundError(
        f"{folder}: no tokenizer found (expected 'toy', an SD folder with tokenizer/, vocab.json + merges.txt, "
        "or tokenizer.json)"
    )
