"""Prompt tokenizers behind one interface: SD's CLIP tokenizer, or a word-level toy one for CPU work.

Both give `(N, max_length)` int32 ids: BOS, tokens, EOS, then padding. A prompt longer than
`max_length` tokens keeps its first `max_length - 1` tokens plus the final EOS, and a warning is
logged (as SD pipelines do). Words outside the vocabulary (the toy tokenizer's; CLIP's byte-level BPE
has none) become the unknown token, with a warning naming them. Each warning is given once per prompt or
word and tokenizer, in one line per call, so that a training run or a batch of negatives does not repeat it.
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
_SHOWN_PROMPT = 60  # characters of a prompt quoted in a warning
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
        self._warned: set[str] = set()  # prompts and words already warned about

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
        hf = self.hf_tokenizer
        encoded = hf(list(texts), return_offsets_mapping=hf.is_fast, verbose=False)  # its own too-long warning repeats ours
        # CLIP's unknown token is its EOS: only a distinct one marks a word outside the vocabulary.
        unk = hf.unk_token_id if hf.unk_token_id not in (hf.bos_token_id, hf.eos_token_id, self.pad_id) else None
        truncated, unknown = {}, {}
        for row, (text, ids) in enumerate(zip(texts, encoded["input_ids"])):
            if unk is not None and unk in ids:
                spans = encoded["offset_mapping"][row] if hf.is_fast else []
                for word in [text[a:b] for (a, b), i in zip(spans, ids) if i == unk] or [text]:
                    unknown.setdefault(word, None)
            if len(ids) > self.max_length:
                truncated.setdefault(text, len(ids))
                ids = ids[: self.max_length - 1] + ids[-1:]  # keep the closing EOS
            out[row, : len(ids)] = ids
        new = [t for t in truncated if t not in self._warned]
        if new:
            shown = "; ".join(f"{_shorten(t)} ({truncated[t]} tokens)" for t in new)
            log.warning("%d prompt(s) longer than %d tokens truncated: %s", len(new), self.max_length, shown)
        new_words = [w for w in unknown if w not in self._warned]
        if new_words:
            log.warning(
                "word(s) outside the tokenizer's vocabulary, read as %s: %s", hf.unk_token, ", ".join(map(repr, new_words))
            )
        self._warned.update(new, new_words)
        return out

    def count(self, text: str) -> int:
        """The tokens `text` takes, start and end tokens included (more than `max_length` are truncated)."""
        return len(self.hf_tokenizer(text, verbose=False)["input_ids"])

    def save(self, folder: str | os.PathLike) -> None:
        """Saves the tokenizer files so that `load_tokenizer(folder)` gives it back."""
        self.hf_tokenizer.save_pretrained(os.fspath(folder))


def _shorten(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_PROMPT else text[: _SHOWN_PROMPT - 3] + "...")


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
