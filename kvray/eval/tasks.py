"""Synthetic RULER-style tasks (needle retrieval, variable tracking, common and frequent words):
`Sample`, `TASKS` and `make_samples`, with each context fitted to a target length in tokens."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import random
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kvray.eval import haystack as hs

METRICS: tuple[str, ...] = ("all", "part")
TASKS: tuple[str, ...] = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
    "niah_list",
)
VALUE_KINDS: tuple[str, ...] = ("number", "word", "uuid")
MIN_LENGTH = 128
MAX_LENGTH = 131072
LENGTH_TOLERANCE = 0.05  # a context is within this relative error of the target (contract)
_AIM = 0.005  # the search stops early once this close

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Sample:
    """One evaluation example. The user turn is the context, then the question (kvray's
    `build_prompt` puts a blank line between them); the answer starts with `answer_prefix`,
    and a prediction is scored against every string in `answers`."""

    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]  # every reference string (string_match_all: each must appear)
    max_new_tokens: int
    task: str
    sample_id: str
    metric: str = "all"  # "all" (string_match_all) or "part" (string_match_part)
    length: int | None = None  # target context length in tokens (generated tasks); None for datasets

    def __post_init__(self):
        answers = self.answers
        if isinstance(answers, str):
            answers = (answers,)
        answers = tuple(answers)
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"Sample.answers must be a non-empty sequence of non-blank strings, got {self.answers!r}")
        object.__setattr__(self, "answers", answers)
        if self.metric not in METRICS:
            raise ValueError(f"Sample.metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if (not isinstance(self.max_new_tokens, numbers.Integral) or isinstance(self.max_new_tokens, bool)
                or self.max_new_tokens < 1):
            raise ValueError(f"Sample.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))


# ---------------------------------------------------------------------------- token counting

@lru_cache(maxsize=1)
def _default_tokenizer():
    from kvray.models import load_tokenizer  # imported late: `import kvray.eval` stays light

    return load_tokenizer()


def _count_with_default_tokenizer(text: str) -> int:
    return len(_default_tokenizer()(text, add_special_tokens=False).input_ids)


class _Counter:
    """Wraps the user's counter; remembers short strings (sentences), not whole contexts."""

    def __init__(self, count_tokens: CountTokens | Any | None):
        if count_tokens is None:
            fn = _count_with_default_tokenizer
        elif hasattr(count_tokens, "encode") and hasattr(count_tokens, "decode"):
            def fn(text: str, _tok=count_tokens) -> int:  # a tokenizer was passed
                return len(_tok.encode(text, add_special_tokens=False))
        elif callable(count_tokens):
            fn = count_tokens
        else:
            raise TypeError("count_tokens must be a callable str -> int, a tokenizer or None "
                            f"(the embedded SmolLM2 tokenizer); got {type(count_tokens).__name__}")
        self._fn = fn
        self._memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if len(text) <= 512 and text in self._memo:
            return self._memo[text]
        n = self._fn(text)
        if not isinstance(n, numbers.Integral) or n < 0:
            raise TypeError(f"count_tokens must return a non-negative int, got {n!r}")
        if len(text) <= 512:
            self._memo[text] = int(n)
        return int(n)


# ---------------------------------------------------------------------------- length fitting

def _fit(render: Callable[[int], str], count: _Counter, length: int, guess: int,
         what: str) -> tuple[int, str, int]:
    """Choose the number of filler units `k` so that `count(render(k))` is closest to `length`.

    `render(k)`'s token count must grow with `k`. Secant steps on the measured tokens per unit,
    kept inside the bracket of what is known to be too short / too long, so only a handful of
    full tokenisations are needed. Returns (k, text, tokens)."""
    measured: dict[int, tuple[int, str]] = {}

    def measure(k: int) -> int:
        if k not in measured:
            text = render(k)
            measured[k] = (count(text), text)
        return measured[k][0]

    base = measure(0)
    if base > length:
        raise ValueError(f"length={length} is too short for {what}: the instructions and planted items "
                         f"alone take {base} tokens; ask for length >= {math.ceil(base / 0.9)}")
    lo, hi = 0, None  # render(lo) is too short or exact; render(hi) too long
    k = max(1, guess)
    for _ in range(40):
        tokens = measure(k)
        if abs(tokens - length) <= _AIM * length:
            break
        if tokens < length:
            lo = k
        else:
            hi = k
        if hi is not None and hi - lo <= 1:
            break
        per_unit = max((tokens - base) / k, 0.25)
        step = round((length - tokens) / per_unit) or (1 if tokens < length else -1)
        nxt = k + step
        if not (lo < nxt and (hi is None or nxt < hi)):
            nxt = (lo + hi) // 2 if hi is not None else max(lo + 1, 2 * k)
        k = nxt
    best = min(measured, key=lambda j: (abs(measured[j][0] - length), j))
    return best, measured[best][1], measured[best][0]


def _fit_prose(hay: hs.Haystack, needles: Sequence[tuple[float, str]], wrap: Callable[[str], str],
               count: _Counter, length: int, what: str) -> str:
    """A context of `wrap(haystack with needles)` close to `length` tokens. After the search
    over whole sentences, the last sentence may be swapped for (or followed by) one of a few
    later stream sentences whose size closes the remaining gap (matters for short contexts)."""
    k, text, tokens = _fit(lambda j: wrap(hay.render(range(j), needles)), count, length,
                           guess=max(1, length // 24), what=what)
    if abs(tokens - length) <= _AIM * length:
        return text
    pool = hay.sentences(k + 48)
    last = count(pool[k - 1]) if k else 0
    options = []
    for j in range(k, k + 48):
        size = count(pool[j])
        if k:
            options.append((abs(tokens - last + size - length), j, [*range(k - 1), j]))
        options.append((abs(tokens + size - length), j, [*range(k), j]))
    err, _, order = min(options, key=lambda o: (o[0], o[1], len(o[2])))
    if err < abs(tokens - length):
        candidate = wrap(hay.render(order, needles))
        got = count(candidate)
        if abs(got - length) < abs(tokens - length):
            return candidate
    return text


# ---------------------------------------------------------------------------- shared pieces

def _keys(rng: random.Random, n: int) -> list[str]:
    """`n` distinct adjective-noun keys, e.g. 'misty-lantern'."""
    return [f"{a}-{b}" for a, b in zip(rng.sample(hs.adjectives(), n), rng.sample(hs.nouns(), n))]


def _values(rng: random.Random, kind: str, n: int) -> list[str]:
    if kind == "number":
        out: list[str] = []
        while len(out) < n:
            v = str(rng.randint(1_000_000, 9_999_999))
            if v not in out:
                out.append(v)
        return out
    if kind == "uuid":
        return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
    return rng.sample(hs.value_words(), n)


def _stratified_depths(rng: random.Random, n: int) -> list[float]:
    """One depth in each of `n` equal slices of the haystack, in a shuffled order."""
    depths = [(i + rng.random()) / n for i in range(n)]
    rng.shuffle(depths)
    return depths


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def _niah_preamble(kind: str) -> str:
    return (f"Some special magic {kind}s are hidden in the text below. Read it carefully and remember "
            f"them: you will be asked about them afterwards.\n\n")


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _niah_sample(rng, length, count, what, *, kind, needles, question, answer_prefix, answers,
                 max_new_tokens) -> dict:
    hay = hs.Haystack(random.Random(rng.getrandbits(64)))
    preamble = _niah_preamble(kind)
    context = _fit_prose(hay, needles, lambda body: preamble + body, count, length, what)
    return dict(context=context, question=question, answer_prefix=answer_prefix, answers=tuple(answers),
                max_new_tokens=max_new_tokens)


def _niah_tokens(kind: str, n_values: int) -> int:
    if n_values == 1:
        return 64 if kind == "uuid" else 32
    return max(96, n_values * (40 if kind == "uuid" else 16) + 32)


# ---------------------------------------------------------------------------- the tasks

def _niah_single(rng, length, count, *, value_kind, depth):
    key, = _keys(rng, 1)
    value, = _values(rng, value_kind, 1)
    d = rng.random() if depth is None else depth
    return _niah_sample(
        rng, length, count, "niah_single", kind=value_kind,
        needles=[(d, _needle(value_kind, key, value))],
        question=f"Which special magic {value_kind} is given for {key} in the text above?",
        answer_prefix=f"The special magic {value_kind} for {key} mentioned in the provided text is",
        answers=[value], max_new_tokens=_niah_tokens(value_kind, 1))


def _niah_multikey(rng, length, count, *, value_kind, num_distractors):
    keys = _keys(rng, 1 + num_distractors)
    values = _values(rng, value_kind, 1 + num_distractors)
    needles = sorted((rng.random(), _needle(value_kind, k, v)) for k, v in zip(keys, values))
    return _niah_sample(
        rng, length, count, "niah_multikey", kind=value_kind, needles=needles,
        question=f"Which special magic {value_kind} is given for {keys[0]} in the text above?",
        answer_prefix=f"The special magic {value_kind} for {keys[0]} mentioned in the provided text is",
        answers=[values[0]], max_new_tokens=_niah_tokens(value_kind, 1))


def _niah_multivalue(rng, length, count, *, value_kind, num_values):
    key, = _keys(rng, 1)
    values = _values(rng, value_kind, num_values)
    needles = sorted(zip(_stratified_depths(rng, num_values), (_needle(value_kind, key, v) for v in values)))
    return _niah_sample(
        rng, length, count, "niah_multivalue", kind=value_kind, needles=needles,
        question=(f"The text above gives several special magic {value_kind}s for {key}. "
                  f"What are all of them? List every one."),
        answer_prefix=f"The special magic {value_kind}s for {key} mentioned in the provided text are",
        answers=values, max_new_tokens=_niah_tokens(value_kind, num_values))


def _niah_multiquery(rng, length, count, *, value_kind, num_queries):
    keys = _keys(rng, num_queries)
    values = _values(rng, value_kind, num_queries)
    needles = sorted(zip(_stratified_depths(rng, num_queries),
                         (_needle(value_kind, k, v) for k, v in zip(keys, values))))
    return _niah_sample(
        rng, length, count, "niah_multiquery", kind=value_kind, needles=needles,
        question=(f"What are the special magic {value_kind}s for {_join(keys)} in the text above? "
                  f"Give the one for each of them."),
        answer_prefix=f"The special magic {value_kind}s for {_join(keys)} mentioned in the provided text are",
        answers=values, max_new_tokens=_niah_tokens(value_kind, num_queries))


def _variable_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def _vt(rng, length, count, *, num_chains, num_hops):
    size = num_hops + 1
    names = _variable_names(rng, num_chains * size)
    values: list[str] = []
    while len(values) < num_chains:
        v = str(rng.randint(10_000, 99_999))
        if v not in values:
            values.append(v)
    needles = []
    for c in range(num_chains):
        chain = names[c * size:(c + 1) * size]
        lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, size)]
        # increasing depths keep each chain in assignment order
        needles += [(d, c, hop, line) for hop, (d, line) in enumerate(zip(sorted(rng.random() for _ in lines), lines))]
    needles = [(d, line) for d, _, _, line in sorted(needles)]
    hay = hs.Haystack(random.Random(rng.getrandbits(64)))
    preamble = ("The text below hides one or more chains of variable assignments. Keep track of them: "
                "you will be asked which variables end up holding a given value.\n\n")
    context = _fit_prose(hay, needles, lambda body: preamble + body, count, length, "vt")
    target = values[0]
    return dict(
        context=context,
        question=(f"Which variables are assigned the value {target} in the text above, either directly "
                  f"or through a chain of assignments? List all of them."),
        answer_prefix=f"Following the assignments in the text above, the variables that hold the value {target} are:",
        answers=tuple(names[:size]),
        max_new_tokens=max(48, 10 * size))


def _cwe(rng, length, count, *, num_common, freq_common, freq_rare):
    preamble = ("Below is a numbered list of words. A few of the words come up many times, the rest only "
                "now and then. Notice which words come up most often.\n\n")
    question = f"Which {num_common} words come up most often in the list above?"
    answer_prefix = f"Answer: The {num_common} words that appear most often in the list above are:"
    fixed_text = (preamble + question + answer_prefix).lower()

    est_entries = max(1.0, (length - 40) / 7)  # ~7 tokens per "123. word" line with SmolLM2
    fc = freq_common if freq_common is not None else min(30, max(2, round(0.3 * est_entries / num_common)))
    fr = freq_rare if freq_rare is not None else (1 if fc < 8 else 2 if fc < 20 else 3)
    if fr >= fc:
        raise ValueError(f"cwe needs freq_common > freq_rare, got freq_common={fc}, freq_rare={fr}")

    pool = sorted({w.lower() for w in (*hs.value_words(), *hs.adjectives(), *hs.nouns()) if len(w) >= 4})
    rng.shuffle(pool)
    # A common word must not hide inside another word of the list or of the prompt, or a
    # prediction could match it by accident.
    common = [w for w in pool if w not in fixed_text and not any(w in o for o in pool if o != w)][:num_common]
    if len(common) < num_common:
        raise ValueError(f"cwe supports num_common <= {len(common)}, got {num_common}")
    rare_words = [w for w in pool if w not in common and not any(c in w for c in common)]
    word_rng = random.Random(rng.getrandbits(64))
    seen = set(pool)

    def rare_sequence(k: int) -> list[str]:
        while len(rare_words) * fr < k:
            w = hs.pseudo_word(word_rng, syllables=word_rng.choice((2, 3)))
            if w not in seen and not any(c in w for c in common):
                seen.add(w)
                rare_words.append(w)
        return [w for w in rare_words[: math.ceil(k / fr)] for _ in range(fr)][:k]

    order_seed = rng.getrandbits(64)

    def render(k: int) -> str:
        entries = [w for w in common for _ in range(fc)] + rare_sequence(k)
        random.Random(f"{order_seed}/{k}").shuffle(entries)
        return preamble + "\n".join(f"{i}. {w}" for i, w in enumerate(entries, 1))

    _, context, _ = _fit(render, count, length, guess=max(1, round(est_entries - fc * num_common)),
                         what=f"cwe with num_common={num_common}, freq_common={fc}")
    return dict(context=context, question=question, answer_prefix=answer_prefix, answers=tuple(common),
                max_new_tokens=max(128, 13 * num_common))


def _fwe(rng, length, count, *, alpha):
    num_top = 3
    preamble = ("Below is a passage written in made-up words. Some of the words are used far more often "
                "than others; keep count of how often each one appears.\n\n")
    question = "Which three made-up words appear most often in the passage above? Do not explain, just list them."
    answer_prefix = "Answer: The three most frequent made-up words in the passage above are:"
    fixed_text = (preamble + question + answer_prefix).lower()

    est_words = max(10, length // 3)
    vocab: list[str] = []
    while len(vocab) < min(2000, max(20, est_words // 3)):
        w = hs.pseudo_word(rng)  # all five letters long: none is a substring of another
        if w not in vocab and w not in fixed_text:
            vocab.append(w)
    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    stream: list[str] = []

    def words(k: int) -> list[str]:
        while len(stream) < k:
            stream.extend(rng.choices(vocab, weights, k=max(256, k - len(stream))))
        return stream[:k]

    def text_of(ws: Sequence[str]) -> str:
        return preamble + " ".join(ws)

    k, _, _ = _fit(lambda j: text_of(words(j)), count, length, guess=est_words, what="fwe")
    chosen = list(words(k))
    # The answer must be unambiguous: if the third and fourth counts tie, turn occurrences of
    # the strongest runner-up into the weakest top word until the top three stand apart.
    while True:
        ranked = Counter(chosen).most_common()
        if len(ranked) <= num_top or ranked[num_top - 1][1] > ranked[num_top][1]:
            break
        weak, runner = ranked[num_top - 1][0], ranked[num_top][0]
        last = max(i for i, w in enumerate(chosen) if w == runner)
        chosen[last] = weak
    top = [w for w, _ in Counter(chosen).most_common(num_top)]
    if len(top) < num_top:
        raise ValueError(f"length={length} is too short for fwe: fewer than {num_top} distinct words fit")
    return dict(context=text_of(chosen), question=question, answer_prefix=answer_prefix, answers=tuple(top),
                max_new_tokens=48)


# ---------------------------------------------------------------------------- long answers

_LIST_PREAMBLE = ("Entries of a special magic list are hidden one at a time in the text below. Read it "
                  "carefully and remember every entry in order: you will be asked for the whole list "
                  "afterwards.\n\n")
_LIST_QUESTION = ("What are all the entries of the special magic list in the text above? List every one, "
                  "in the order they appear.")
_LIST_PREFIX = "The entries of the special magic list, in the order they appear in the text, are:"


def list_size(length: int) -> int:
    """niah_list's default number of items: 30 from about 2k tokens on, fewer in shorter contexts
    (one per 64 tokens, at least 2) so the planted sentences stay about a fifth of the text."""
    return min(30, max(2, length // 64))


def _niah_list(rng, length, count, *, value_kind, num_items):
    """A long answer: `num_items` values planted at spread depths (one in each equal slice of
    the haystack, in slice order), the question asks for all of them in order. Scored with
    string_match_all, i.e. recall (the share of planted items the prediction contains,
    order-insensitive); the answer's order is the context's."""
    n = list_size(length) if num_items is None else num_items
    fixed_text = (_LIST_PREAMBLE + _LIST_QUESTION + _LIST_PREFIX).lower()
    if value_kind == "word":
        # value words are never substrings of each other nor of the prose; keep them off the prompt too
        pool = [w for w in hs.value_words() if w.lower() not in fixed_text]
        if n > len(pool):
            raise ValueError(f"niah_list with value_kind='word' supports num_items <= {len(pool)}, got {n}")
        values = rng.sample(pool, n)
    else:
        values = _values(rng, value_kind, n)
    depths = [(i + rng.random()) / n for i in range(n)]  # increasing: list order = context order
    needles = [(d, f"The next entry of the special magic list is: {v}.") for d, v in zip(depths, values)]
    hay = hs.Haystack(random.Random(rng.getrandbits(64)))
    context = _fit_prose(hay, needles, lambda body: _LIST_PREAMBLE + body, count, length,
                         f"niah_list with num_items={n}")
    # room for the list as the model's tokenizer writes it, plus half again for its wording
    answer_tokens = count(" " + ", ".join(values))
    return dict(context=context, question=_LIST_QUESTION, answer_prefix=_LIST_PREFIX, answers=tuple(values),
                max_new_tokens=max(32, math.ceil(1.5 * answer_tokens) + 16))


# ---------------------------------------------------------------------------- options and registry

def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _check_kind(value: Any) -> str:
    if value not in VALUE_KINDS:
        raise ValueError(f"value_kind must be one of {', '.join(VALUE_KINDS)}; got {value!r}")
    return value


def _check_depth(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"depth must be None (random) or a number in [0, 1] (0: start, 1: end), got {value!r}")
    return float(value)


def _check_optional_freq(name: str) -> Callable[[Any], int | None]:
    return lambda v: None if v is None else _check_int(name, v, 1, 1000)


def _check_alpha(value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 < value <= 10.0:
        raise ValueError(f"alpha (the Zipf exponent) must be a number in (0, 10], got {value!r}")
    return float(value)


# name -> (builder, {option: (default, validator)})
_TASKS: dict[str, tuple[Callable[..., dict], dict[str, tuple[Any, Callable[[Any], Any]]]]] = {
    "niah_single": (_niah_single, {"value_kind": ("number", _check_kind), "depth": (None, _check_depth)}),
    "niah_multikey": (_niah_multikey, {
        "value_kind": ("number", _check_kind),
        "num_distractors": (3, lambda v: _check_int("num_distractors", v, 0, 50))}),
    "niah_multivalue": (_niah_multivalue, {
        "value_kind": ("number", _check_kind),
        "num_values": (4, lambda v: _check_int("num_values", v, 1, 50))}),
    "niah_multiquery": (_niah_multiquery, {
        "value_kind": ("number", _check_kind),
        "num_queries": (4, lambda v: _check_int("num_queries", v, 1, 50))}),
    "vt": (_vt, {
        "num_chains": (1, lambda v: _check_int("num_chains", v, 1, 20)),
        "num_hops": (4, lambda v: _check_int("num_hops", v, 1, 50))}),
    "cwe": (_cwe, {
        "num_common": (10, lambda v: _check_int("num_common", v, 1, 50)),
        "freq_common": (None, _check_optional_freq("freq_common")),
        "freq_rare": (None, _check_optional_freq("freq_rare"))}),
    "fwe": (_fwe, {"alpha": (2.0, _check_alpha)}),
    "niah_list": (_niah_list, {
        "value_kind": ("word", _check_kind),
        "num_items": (None, lambda v: None if v is None else _check_int("num_items", v, 1, 100))}),
}
assert tuple(_TASKS) == TASKS


def _check_task(task: Any) -> str:
    if isinstance(task, str) and task in _TASKS:
        return task
    hint = ""
    if isinstance(task, str):
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}.{hint}")


def task_options(task: str) -> dict[str, Any]:
    """The options `make_samples` accepts for `task`, with their defaults."""
    return {name: default for name, (default, _) in _TASKS[_check_task(task)][1].items()}


def make_samples(task: str, n: int, length: int, seed: int = 0, count_tokens: CountTokens | None = None,
                 **options) -> list[Sample]:
    """`n` samples of a synthetic task, each context within 5% of `length` tokens.

    `count_tokens` measures text in tokens (a callable str -> int, or a tokenizer); None uses
    the embedded SmolLM2 tokenizer. Deterministic: sample `i` depends only on (task, seed, i,
    options) plus `length`, so `make_samples(..., n=5)` is a prefix of `n=10`, and a longer
    `length` keeps the same needles at the same relative depths. Options per task:
    `task_options(task)`."""
    task = _check_task(task)
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of samples) must be a positive integer, got {n!r}")
    if not isinstance(length, numbers.Integral) or isinstance(length, bool) or not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"length (target context tokens) must be an integer in [{MIN_LENGTH}, {MAX_LENGTH}], "
                         f"got {length!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    builder, spec = _TASKS[task]
    unknown = sorted(set(options) - set(spec))
    if unknown:
        allowed = ", ".join(f"{k}={d!r}" for k, (d, _) in spec.items()) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for task {task!r}; allowed (with defaults): {allowed}")
    resolved = {k: check(options.get(k, default)) for k, (default, check) in spec.items()}
    changed = {k: v for k, v in resolved.items() if v != spec[k][0]}
    suffix = "-" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8] if changed else ""
    count = _Counter(count_tokens)
    samples = []
    for index in range(int(n)):
        rng = random.Random(f"kvray/{task}/{int(seed)}/{index}")
        fields = builder(rng, int(length), count, **resolved)
        samples.append(Sample(task=task, sample_id=f"{task}-{int(length)}-{int(seed)}-{index}{suffix}",
                              length=int(length), **fields))
    return samples
