"""Noun phrases from a caption: spaCy's noun chunks when a spaCy pipeline is installed, else a
documented heuristic.

The fallback (`HeuristicPhraseExtractor`) reads a caption as word runs split at punctuation,
prepositions, conjunctions, common verbs and participles that end a phrase, and keeps each run that
holds a content word. It starts a new phrase at every determiner or number word, so
"a man riding a horse on the beach" gives "a man", "a horse", "the beach". A participle ("-ing",
"-ed") ends a phrase only when what follows it is not a content word, so "a striped background" stays
whole while "a dog running on grass" splits. It does not know verbs it has not listed
("a dog eats a bone" -> "a dog eats", "a bone"): install spaCy with an English pipeline for real
captions.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

DETERMINERS = frozenset(
    "a an the this that these those his her its their our my your some any each every another "
    "one two three four five six seven eight nine ten several many few".split()
)
BOUNDARY_WORDS = frozenset(
    # prepositions
    "on in at with of near under over above below behind beside besides by to from into onto through "
    "across against along around between inside outside for during toward towards upon among beneath "
    "underneath atop via like as next "
    # conjunctions and relatives
    "and or but nor so yet while where which who whom whose that than when "
    # auxiliaries and common caption verbs
    "is are was were be been being has have had do does did can could will would may might "
    "sits sit stands stand lies lie holds hold looks look shows show appears appear features "
    "contains contain wears wear rides ride walks walk flies fly runs run plays play there here".split()
)
# Words ending in -ing/-ed that are usually nouns or adjectives inside a phrase.
PARTICIPLE_EXCEPTIONS = frozenset(
    "building buildings ceiling ceilings painting paintings clothing ring rings king string strings "
    "wing wings thing things morning evening evenings swing swings pudding earring earrings".split()
)
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]")


def _is_word(token: str) -> bool:
    return token[0].isalnum()


def _is_participle(word: str) -> bool:
    return len(word) > 4 and word.endswith(("ing", "ed")) and word not in PARTICIPLE_EXCEPTIONS


def _is_content(token: str) -> bool:
    low = token.lower()
    return _is_word(token) and low not in DETERMINERS and low not in BOUNDARY_WORDS


class HeuristicPhraseExtractor:
    """Determiner-led word runs (see the module docstring); no model needed."""

    def extract(self, caption: str) -> list[str]:
        tokens = _TOKEN.findall(caption)
        phrases: list[str] = []
        current: list[str] = []

        def close():
            if any(_is_content(t) for t in current):
                phrases.append(" ".join(current))
            current.clear()

        for i, token in enumerate(tokens):
            low = token.lower()
            if not _is_word(token) or low in BOUNDARY_WORDS:
                close()
            elif low in DETERMINERS:
                close()
                current.append(token)
            elif _is_participle(low) and any(_is_content(t) for t in current):
                following = tokens[i + 1] if i + 1 < len(tokens) else None
                if following is not None and _is_content(following):
                    current.append(token)
                else:
                    close()
            else:
                current.append(token)
        close()
        return phrases


class SpacyPhraseExtractor:
    """spaCy's noun chunks; `nlp` is a loaded spaCy pipeline with a parser."""

    def __init__(self, nlp):
        self.nlp = nlp

    def extract(self, caption: str) -> list[str]:
        return [chunk.text for chunk in self.nlp(caption).noun_chunks]


def make_phrase_extractor(spacy_model: str | None):
    """spaCy with `spacy_model` (an installed package name or a local path) when spaCy can load it,
    else the heuristic, with a warning saying why. Nothing is downloaded."""
    if spacy_model is None:
        return HeuristicPhraseExtractor()
    try:
        import spacy
    except ImportError:
        log.warning("spaCy is not installed; using the heuristic phrase extractor instead of %r", spacy_model)
        return HeuristicPhraseExtractor()
    try:
        nlp = spacy.load(spacy_model)
    except OSError as e:  # spaCy raises OSError for a model it cannot find
        log.warning("spaCy cannot load %r (%s); using the heuristic phrase extractor", spacy_model, e)
        return HeuristicPhraseExtractor()
    return SpacyPhraseExtractor(nlp)
