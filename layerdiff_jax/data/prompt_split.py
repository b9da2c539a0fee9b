"""One sentence -> layers: a global prompt split into a background prompt and one prompt per foreground layer.

`split_prompt("a cat and a lamp in front of a window")` gives background "a window" and layers ("a cat",
"a lamp"), deepest first: the objects' order in the sentence is the layer order, as in the synthetic
dataset's prompts ("a red circle, a blue square and a green triangle on a white striped background"), which
it splits back exactly. Rules over the ways English lists objects and places them, applied in this order:

1. Whitespace is collapsed and a trailing full stop or exclamation mark dropped.
2. Style is dropped from the layers; it stays in the global prompt, which conditions every layer. A leading
   "a photo of", "an image of", "a painting of", "an oil painting of", ... and trailing style phrases:
   comma-separated segments made of style words (", digital art", ", highly detailed, 4k"), ", by <artist>",
   and "in <x> style" / "in the style of <x>" at the end.
3. A refusal: "or" offers alternatives ("a cat or a dog"), not layers.
4. The background, the first of these forms that applies:
   a. "<objects> with <background> in the background" (or ", <background> in the background");
   b. "<background> with <objects> in the foreground";
   c. "<place> <background>, <objects>", a leading place ("in a quiet forest, a deer and a fox");
   d. "<objects> <place> <background>": the LAST placing preposition (on, in, in front of, against, over,
      under, beneath, by, near, at, ... see `PLACES`) starts the background. Earlier ones stay with their
      object ("a bird on a branch against the sky": layer "a bird on a branch"). A place that is a time
      ("at night", "at sunset", "in winter") or clothes ("in a red dress") is skipped: it describes what
      comes before it. A background that lists several things ("on a mat next to a dog") is refused as
      ambiguous.
   e. None named: `BACKGROUND_PROMPT` ("the background", the sampler's default), if at least two objects are
      listed; a single object and no background is nothing to split, and refused.
5. The objects, in sentence order: split at commas, "and" (Oxford comma included), "&", and at "next to",
   "beside", "alongside", "along with", "behind" ("X behind Y": X is the deeper, so the order holds).
   When the list starts with a determiner (a, the, two, ...), a comma or "and" splits only before another
   one: "a big, fluffy cat" and "a black and white cat" are one object each. An empty item is refused.
   "with" joins nothing: it describes its object ("a girl with a red umbrella" is one layer), since what one
   holds, wears or carries overlaps it and has no depth order of its own. Verbs stay with their subject for
   the same reason ("an astronaut riding a horse", "two dogs playing"), and a plural is one layer ("two dogs").
6. At most `max_layers` layers, the background included, when the caller gives the model's max_layers.

Pure Python: it imports nothing heavy, so the command-line tools split a prompt before loading JAX.
"""

from __future__ import annotations

import dataclasses
import re

from layerdiff_jax.diffusion.settings import BACKGROUND_PROMPT

# Placing prepositions, the multi-word ones first so that "in front of" wins over "in".
PLACES = (
    "in front of", "on top of", "in the middle of", "on", "upon", "over", "above", "against", "before", "under",
    "underneath", "beneath", "below", "by", "near", "at", "in", "inside", "among", "amid",
)
_DETERMINERS = frozenset(
    "a an the this that these those some several many few each every another his her their my our your its "
    "one two three four five six seven eight nine ten".split()
)
# Words that make a trailing comma segment a style, not an object or a place.
_STYLE_WORDS = frozenset(
    "art artwork style painting photo photograph photography render rendering illustration drawing sketch "
    "watercolor watercolour anime cartoon cinematic lighting detailed realistic photorealistic hyperrealistic "
    "4k 8k hd uhd artstation octane masterpiece bokeh".split()
)
# A place followed by these describes what comes before it: a time, or clothes.
_TIMES = frozenset(
    "night sunset sunrise dawn dusk noon midnight twilight morning evening afternoon daytime "
    "winter summer spring autumn rain".split()
)
_CLOTHES = frozenset(
    "dress suit coat jacket hat shirt t-shirt uniform costume armor armour robe gown sweater hoodie kimono tuxedo "
    "scarf sunglasses glasses boots jeans".split()
)

_STYLE_PREFIX = re.compile(
    r"^(?:a|an)\s+(?:(?!(?:a|an|the|and|with)\s)[\w-]+\s+){0,3}?"  # up to three adjectives: "a high quality"
    r"(?:photo|photograph|picture|image|painting|drawing|illustration|render|rendering|sketch|watercolou?r|portrait"
    r"|poster|cartoon|close-up)\s+of\s+(?=\S)",
    re.IGNORECASE,
)
_STYLE_SUFFIX = re.compile(r"\s+in\s+(?:the\s+style\s+of\s+.+|(?:[\w'-]+\s+){1,3}style)$", re.IGNORECASE)
_ANY_PLACE = "(?:" + "|".join(PLACES).replace(" ", r"\s+") + r")\s+"
_PLACE = re.compile(r"\b" + _ANY_PLACE, re.IGNORECASE)
_IN_THE_BACKGROUND = re.compile(r"^(?P<objects>.+)(?:,?\s+with\s+|,\s*)(?P<background>.+?)\s+in\s+the\s+background$",
                                re.IGNORECASE)
_IN_THE_FOREGROUND = re.compile(r"^(?P<background>.+?)\s+with\s+(?P<objects>.+?)\s+in\s+the\s+foreground$",
                                re.IGNORECASE)
_LEADING_PLACE = re.compile("^" + _ANY_PLACE + r"(?P<background>[^,]+),\s*(?P<objects>.+)$", re.IGNORECASE)
# List separators, captured so that a glued item keeps its text; ", and" before "," (the Oxford comma).
_LIST_SEPARATOR = re.compile(r"(\s*,\s*and\s+|\s*,\s*|\s+and\s+|\s*&\s*)", re.IGNORECASE)
_JOINER = re.compile(r"\s+(?:next\s+to|beside|alongside|along\s+with|behind)\s+", re.IGNORECASE)
_OR = re.compile(r"\bor\b", re.IGNORECASE)


class PromptSplitError(ValueError):
    """A prompt that the rules cannot split into layers; the one-line message says why."""


@dataclasses.dataclass(frozen=True)
class LayerSplit:
    """The layers a global prompt names: the background and the foregrounds, deepest first."""

    global_prompt: str  # as given: the model sees it whole, style included
    background_prompt: str
    layer_prompts: tuple[str, ...]  # the foreground layers, deepest first


def split_prompt(text: str, max_layers: int | None = None) -> LayerSplit:
    """The background and foreground layer prompts of `text` (module docstring: the rules, in order).

    max_layers: the model's layer count, background included; a prompt naming more layers is refused.
    Raises PromptSplitError when no rule applies or the layers do not fit.
    """
    if max_layers is not None and max_layers < 2:
        raise ValueError(f"max_layers must be >= 2 (the background and a foreground), got {max_layers}")
    content = _drop_style(" ".join(text.split()).rstrip(".!").rstrip())
    if not content:
        raise _unsplittable("no words left without style and punctuation" if text.strip() else "the prompt is empty")
    if _OR.search(content):
        raise _unsplittable(f"'or' offers alternatives, not layers, in {content!r}")
    background, objects = _find_background(content)
    layers = _split_objects(objects)
    if background is None:
        if len(layers) < 2:
            what = "a place and no object before it" if _PLACE.match(objects) else "one object and no background named"
            raise _unsplittable(f"{what}, in {objects!r}: nothing to split")
        background = BACKGROUND_PROMPT
    if max_layers is not None and 1 + len(layers) > max_layers:
        raise PromptSplitError(
            f"the prompt names {len(layers)} objects, {1 + len(layers)} layers with the background, but the model "
            f"takes at most {max_layers} layers ({max_layers - 1} objects): give fewer objects"
        )
    return LayerSplit(global_prompt=text, background_prompt=background, layer_prompts=tuple(layers))


def _unsplittable(reason: str) -> PromptSplitError:
    return PromptSplitError(f"could not split this prompt: give the layers yourself ({reason})")


def _drop_style(text: str) -> str:
    """Rule 2: the text without a leading "a photo of" and trailing style phrases."""
    text = _STYLE_PREFIX.sub("", text)
    while True:
        head, comma, tail = text.rpartition(",")
        if not comma or not _is_style(tail.split()):
            break
        text = head.rstrip()
    return _STYLE_SUFFIX.sub("", text)


def _is_style(words: list[str]) -> bool:
    """Whether a comma segment is a style: ", digital art", ", by an artist"; not ", a dog" or ", by the sea"."""
    words = [w.lower() for w in words]
    if not words or words[0] in _DETERMINERS:
        return False
    if words[0] == "by":  # "by" and a name is an artist; "by" and a determiner is a place
        return len(words) > 1 and words[1] not in _DETERMINERS
    return any(w in _STYLE_WORDS for w in words)


def _find_background(text: str) -> tuple[str | None, str]:
    """Rule 4: (background or None, the text naming the objects)."""
    for form in (_IN_THE_BACKGROUND, _IN_THE_FOREGROUND, _LEADING_PLACE):
        match = form.match(text)
        if match:
            return match["background"], match["objects"]
    for place in reversed(list(_PLACE.finditer(text))):
        objects, background = text[: place.start()].rstrip(" ,"), text[place.end():]
        if objects and _is_a_place(place[0], background):
            if len(_split_objects(background)) > 1:
                raise _unsplittable(f"the background {background!r} lists several things: which is behind the others?")
            return background, objects
    return None, text


def _is_a_place(preposition: str, phrase: str) -> bool:
    """Whether `preposition phrase` places the objects: not a time ("at night") nor clothes ("in a red dress")."""
    words = phrase.lower().split()
    if words[0] == "the" and len(words) > 1:
        words = words[1:]
    if words[0] in _TIMES:
        return False
    return not (preposition.strip().lower() == "in" and words[-1] in _CLOTHES)


def _split_objects(text: str) -> list[str]:
    """Rule 5: the objects of a list, in its order; refuses an empty item."""
    objects = []
    for part in _JOINER.split(text):
        objects += _split_list(part)
    if not all(objects):
        raise _unsplittable(f"an empty item in the list {text!r}")
    return objects


def _split_list(text: str) -> list[str]:
    """Splits at commas, "and" and "&"; after a determiner-led first item, only before another determiner."""
    pieces = _LIST_SEPARATOR.split(text)
    items, separators = pieces[0::2], pieces[1::2]
    glue = _has_determiner(items[0])
    objects = [items[0]]
    for separator, item in zip(separators, items[1:]):
        if glue and item and not _has_determiner(item):  # an adjective list: "a big, fluffy cat"
            objects[-1] += separator + item
        else:
            objects.append(item)
    return [o.strip() for o in objects]


def _has_determiner(phrase: str) -> bool:
    words = phrase.lower().split()
    return bool(words) and (words[0] in _DETERMINERS or words[0].isdigit())
