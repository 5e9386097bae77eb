"""The haystack for the synthetic tasks: kvray's own prose (`data/haystack.txt` plus seeded
template sentences), the word lists for keys and values, and seeded sentence streams."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _read_list(name: str) -> tuple[str, ...]:
    """Non-empty, non-comment lines of a data file, in order."""
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


@lru_cache(maxsize=None)
def paragraphs() -> tuple[tuple[str, ...], ...]:
    """The hand-written paragraphs of `data/haystack.txt`, each a tuple of sentences."""
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    for line in (DATA_DIR / "haystack.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        if line:
            current.append(line)
        elif current:
            out.append(tuple(current))
            current = []
    if current:
        out.append(tuple(current))
    return tuple(out)


@lru_cache(maxsize=None)
def adjectives() -> tuple[str, ...]:
    return _read_list("adjectives.txt")


@lru_cache(maxsize=None)
def nouns() -> tuple[str, ...]:
    return _read_list("nouns.txt")


@lru_cache(maxsize=None)
def haystack_vocabulary() -> frozenset[str]:
    """Every lower-case word that prose sentences (hand-written or templated) can contain."""
    words: set[str] = set()
    for para in paragraphs():
        for sentence in para:
            words.update(re.findall(r"[a-z]+", sentence.lower()))
    for template in _TEMPLATES:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", template).lower()))
    for choices in _SLOTS.values():
        for choice in choices:
            words.update(re.findall(r"[a-z]+", choice.lower()))
    return frozenset(words)


@lru_cache(maxsize=None)
def value_words() -> tuple[str, ...]:
    """Words for needle values and cwe's list, minus any the prose can contain (even inside a
    longer word), so a planted word occurs in a context only where it was planted."""
    vocab = haystack_vocabulary()
    return tuple(w for w in _read_list("value_words.txt") if not any(w.lower() in v for v in vocab))


def pseudo_word(rng: random.Random, syllables: int = 2) -> str:
    """A pronounceable made-up word: consonant-vowel syllables and a closing consonant
    (2 syllables -> 5 letters, so two different ones are never substrings of each other)."""
    parts = [rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return "".join(parts) + rng.choice(_CONSONANTS)


# Templated sentences give long contexts fresh material once the hand-written paragraphs run
# out, so a 16k-token haystack does not visibly loop. Slots are filled independently.
_TEMPLATES = (
    "The {person} walked down to the {place} {time} and found the {thing} exactly where it had been left.",
    "Nobody in the {group} could explain why the {thing} by the {place} had been painted {colour}.",
    "{Time}, the {group} gathered near the {place} to talk about the {weather} and the price of {goods}.",
    "The {person} kept a {adj} {thing} on a shelf in the kitchen and refused to say where it came from.",
    "After the {weather}, the path to the {place} was {state}, so most people took the long way round.",
    "The {group} spent a whole afternoon repairing the {thing} behind the {building}, and they argued the whole time.",
    "A visitor once asked the {person} for directions to the {place}, and was sent the wrong way on purpose.",
    "The {person} claimed that {goods} always tasted better when they were bought at the {place}.",
    "{Time}, a {adj} {thing} was found beside the {place}, and the {group} debated what to do with it.",
    "The old {thing} near the {place} creaked in the {weather}, but it had never once fallen down.",
    "Everyone agreed that the {person} told the best stories, even though most of them were invented.",
    "The {group} painted the door of the {building} {colour} and then regretted it for a whole season.",
    "When the {weather} came, the {person} closed the shutters, lit the stove and waited patiently.",
    "The {person} swapped a basket of {goods} for a {adj} {thing} and considered it a fair trade.",
    "People still talk about the {adj} {thing} that the {person} carried all the way to the {place} one {season}.",
    "The road past the {place} was quiet {time}, apart from the {person} whistling an old tune.",
    "In the {season} the {group} walked to the {place} to watch the light change over the hills.",
    "The {person} wrote down everything about the {thing} in a notebook that nobody else was allowed to read.",
)

_SLOTS: Mapping[str, tuple[str, ...]] = {
    "person": ("miller", "ferryman", "schoolteacher", "blacksmith", "baker", "shepherd", "postmistress",
               "innkeeper", "carpenter", "weaver", "fisherman", "doctor", "gardener", "mayor", "night watchman",
               "beekeeper", "cobbler", "stationmaster", "lighthouse keeper", "potter"),
    "group": ("choir", "village council", "fishing crews", "farmers", "children from the school",
              "neighbours", "walking club", "market traders", "bell ringers", "card players"),
    "place": ("mill", "bridge", "old quarry", "harbour wall", "chapel", "crossroads", "orchard", "station",
              "riverbank", "market square", "village green", "boathouse", "ridge", "well", "churchyard",
              "bakery", "allotments", "ferry landing", "smithy", "tollhouse"),
    "building": ("mill", "chapel", "station", "boathouse", "bakery", "smithy", "tollhouse", "inn", "school",
                 "post office", "barn", "village hall"),
    "state": ("flooded", "blocked by fallen branches", "slippery", "deep in mud", "covered in leaves",
              "washed away in places"),
    "thing": ("lantern", "wheelbarrow", "weather vane", "bench", "clock", "rowing boat", "gate", "signpost",
              "barrel", "ladder", "bell", "cart", "scarecrow", "fence", "kettle", "chest", "map", "anchor"),
    "adj": ("battered", "shiny", "crooked", "heavy", "muddy", "peculiar", "faded", "splendid", "rickety",
            "enormous", "tiny", "rusty", "polished", "soggy", "lopsided", "handsome"),
    "colour": ("green", "yellow", "bright blue", "deep red", "white", "orange", "purple", "grey"),
    "time": ("early one morning", "late in the evening", "just after lunch", "on a Sunday afternoon",
             "at first light", "before the market opened", "long after dark", "on a wet Tuesday"),
    "weather": ("storm", "heavy rain", "long frost", "gale", "snowfall", "heatwave", "thick fog", "hailstorm"),
    "goods": ("apples", "eggs", "pears", "potatoes", "herrings", "onions", "leeks", "plums", "candles",
              "mushrooms"),
    "season": ("spring", "summer", "autumn", "winter"),
}


def _fill(template: str, rng: random.Random) -> str:
    def repl(match: re.Match) -> str:
        slot = match.group(1)
        value = rng.choice(_SLOTS[slot.lower()])
        return value[0].upper() + value[1:] if slot[0].isupper() else value

    return re.sub(r"\{(\w+)\}", repl, template)


def template_paragraph(rng: random.Random) -> tuple[str, ...]:
    """Four to six templated sentences (different templates) read as one paragraph."""
    return tuple(_fill(t, rng) for t in rng.sample(_TEMPLATES, rng.randint(4, 6)))


class Haystack:
    """A seeded, endless stream of prose sentences, extended on demand.

    Hand-written paragraphs come in a shuffled order (reshuffled once exhausted), with a
    templated paragraph after every second one. `render` cuts the first `k` sentences and
    plants extra sentences (needles) in the gaps between them."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._sentences: list[str] = []
        self._ends: list[bool] = []  # sentence closes a paragraph
        self._queue: list[tuple[str, ...]] = []
        self._since_template = 0

    def _next_paragraph(self) -> tuple[str, ...]:
        if self._since_template >= 2:
            self._since_template = 0
            return template_paragraph(self._rng)
        if not self._queue:
            self._queue = list(paragraphs())
            self._rng.shuffle(self._queue)
        self._since_template += 1
        return self._queue.pop()

    def sentences(self, k: int) -> list[str]:
        """The first `k` sentences of the stream."""
        while len(self._sentences) < k:
            para = self._next_paragraph()
            self._sentences.extend(para)
            self._ends.extend([False] * (len(para) - 1) + [True])
        return self._sentences[:k]

    def render(self, order: Sequence[int], needles: Sequence[tuple[float, str]] = ()) -> str:
        """Text of the stream sentences at indices `order`, with each `(depth, needle)` planted
        in the gap nearest `depth * len(order)` (0: before the first sentence, 1: after the
        last). Needles sharing a gap keep their given order."""
        if order:
            self.sentences(max(order) + 1)
        gaps: dict[int, list[str]] = {}
        for depth, needle in needles:
            gaps.setdefault(min(len(order), max(0, round(depth * len(order)))), []).append(needle)
        parts: list[str] = []
        for gap in range(len(order) + 1):
            for needle in gaps.get(gap, ()):
                parts += (needle, " ")
            if gap < len(order):
                i = order[gap]
                parts += (self._sentences[i], "\n\n" if self._ends[i] else " ")
        return "".join(parts).rstrip()
