"""Synthetic tasks (kvray.eval.tasks) and their scoring (kvray.eval.metrics): offline, seeded."""

import hashlib
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from kvray.eval import (TASKS, Sample, make_samples, score_sample, string_match_all, string_match_part,
                        task_options)
from kvray.eval import haystack as hs
from kvray.eval import tasks as tasks_mod

SEEDS = (0, 1, 2)
NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


@pytest.fixture(scope="module")
def tok():
    # kvray.models.load_tokenizer(), cached where make_samples' default counter finds it, so
    # the embedded tokenizer is loaded once for the whole module.
    return tasks_mod._default_tokenizer()


@pytest.fixture(scope="module")
def count_tokens(tok):
    return lambda text: len(tok(text, add_special_tokens=False).input_ids)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


# ---------------------------------------------------------------------------- content

@pytest.mark.parametrize("task", TASKS)
def test_answers_literally_in_context(task, count_tokens):
    for seed in SEEDS:
        for s in make_samples(task, 2, 500, seed=seed, count_tokens=count_tokens):
            assert s.task == task
            assert s.answers, s
            for answer in s.answers:
                assert answer in s.context, (task, seed, answer)
            assert s.question and s.answer_prefix
            assert s.context == s.context.strip()  # the prompt builder adds the separator
            assert s.max_new_tokens >= 32


@pytest.mark.parametrize("task", NIAH)
@pytest.mark.parametrize("kind", ("number", "word", "uuid"))
def test_needle_values_planted_exactly_once(task, kind, count_tokens):
    for s in make_samples(task, 3, 500, seed=7, count_tokens=count_tokens, value_kind=kind):
        for answer in s.answers:
            assert s.context.count(answer) == 1, (answer, s.context)
            assert f"One of the special magic {kind}s for " in s.context
        if kind == "number":
            assert all(re.fullmatch(r"\d{7}", a) for a in s.answers)
        if kind == "uuid":
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)
                       for a in s.answers)
    assert make_samples(task, 1, 500, count_tokens=count_tokens, value_kind="uuid")[0].max_new_tokens >= 64


def test_niah_questions_name_the_keys(count_tokens):
    single = make_samples("niah_single", 1, 500, seed=3, count_tokens=count_tokens)[0]
    key = re.search(r"for ([a-z]+-[a-z]+) is: " + single.answers[0], single.context).group(1)
    assert key in single.question and key in single.answer_prefix

    mk = make_samples("niah_multikey", 1, 600, seed=3, count_tokens=count_tokens, num_distractors=5)[0]
    planted = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})", mk.context)
    assert len(planted) == 6 and len({k for k, _ in planted}) == 6
    asked = [k for k, v in planted if k in mk.question]
    assert len(asked) == 1 and dict(planted)[asked[0]] == mk.answers[0]

    mv = make_samples("niah_multivalue", 1, 600, seed=3, count_tokens=count_tokens, num_values=5)[0]
    planted = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})", mv.context)
    assert len(planted) == 5 and len({k for k, _ in planted}) == 1
    assert sorted(v for _, v in planted) == sorted(mv.answers) and planted[0][0] in mv.question

    mq = make_samples("niah_multiquery", 1, 600, seed=3, count_tokens=count_tokens, num_queries=3)[0]
    planted = dict(re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})", mq.context))
    assert len(planted) == 3 and all(k in mq.question for k in planted)
    assert sorted(planted.values()) == sorted(mq.answers)


def test_needles_sit_between_sentences(count_tokens):
    for s in make_samples("niah_multivalue", 3, 1000, seed=5, count_tokens=count_tokens):
        for answer in s.answers:
            needle = re.search(r"One of the special magic numbers for [a-z-]+ is: " + answer + r"\.", s.context)
            before, after = s.context[:needle.start()], s.context[needle.end():]
            assert before.endswith(("\n\n", ". ", "! ", "? ")), before[-40:]
            assert after == "" or re.match(r"\s+[A-Z]", after), after[:40]


def test_depth_option_places_the_needle(count_tokens):
    start = make_samples("niah_single", 1, 800, count_tokens=count_tokens, depth=0.0)[0]
    end = make_samples("niah_single", 1, 800, count_tokens=count_tokens, depth=1.0)[0]
    middle = make_samples("niah_single", 1, 800, count_tokens=count_tokens, depth=0.5)[0]
    assert start.context.split("\n\n", 1)[1].startswith("One of the special magic numbers")
    assert end.context.rstrip().endswith(end.answers[0] + ".")
    position = middle.context.index(middle.answers[0]) / len(middle.context)
    assert 0.3 < position < 0.7
    with pytest.raises(ValueError, match="depth"):
        make_samples("niah_single", 1, 800, count_tokens=count_tokens, depth=1.5)


def test_variable_tracking_chain(count_tokens):
    for seed in SEEDS:
        s = make_samples("vt", 1, 1000, seed=seed, count_tokens=count_tokens, num_hops=5)[0]
        assert len(s.answers) == 6 and len(set(s.answers)) == 6
        value = re.search(r"the value (\d{5})", s.question).group(1)
        first = s.context.index(f"VAR {s.answers[0]} = {value}.")
        positions = [first] + [s.context.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, s.answers[1:])]
        assert positions == sorted(positions)  # assignments appear in chain order
        assert all(re.fullmatch(r"[A-Z]{5}", name) for name in s.answers)
    two = make_samples("vt", 1, 1000, count_tokens=count_tokens, num_chains=2, num_hops=3)[0]
    assert len(re.findall(r"VAR [A-Z]{5} = \d{5}\.", two.context)) == 2
    assert len(re.findall(r"VAR [A-Z]{5} = ", two.context)) == 8


@pytest.mark.parametrize("length", (300, 1000, 4000))
def test_common_words_are_the_most_common(length, count_tokens):
    for s in make_samples("cwe", 2, length, seed=length, count_tokens=count_tokens):
        words = re.findall(r"^\d+\. (\S+)$", s.context, flags=re.M)
        numbers = [int(n) for n in re.findall(r"^(\d+)\. ", s.context, flags=re.M)]
        assert numbers == list(range(1, len(words) + 1))
        counts = Counter(words)
        assert len(s.answers) == 10
        lowest_common = min(counts[w] for w in s.answers)
        highest_other = max(c for w, c in counts.items() if w not in s.answers)
        assert lowest_common > highest_other


@pytest.mark.parametrize("length", (200, 1000, 4000))
def test_frequent_words_are_the_most_frequent(length, count_tokens):
    for seed in SEEDS:
        s = make_samples("fwe", 1, length, seed=seed, count_tokens=count_tokens)[0]
        counts = Counter(s.context.split("\n\n", 1)[1].split())
        ranked = counts.most_common()
        assert len(s.answers) == 3 and set(s.answers) == {w for w, _ in ranked[:3]}
        assert ranked[2][1] > ranked[3][1]  # no tie at the cut


# ---------------------------------------------------------------------------- length

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", (500, 1000, 4000))
def test_context_length_within_five_percent(task, length, count_tokens):
    worst = 0.0
    for seed in (0, 1):
        for s in make_samples(task, 2, length, seed=seed, count_tokens=count_tokens):
            worst = max(worst, abs(count_tokens(s.context) / length - 1))
    assert worst <= 0.05, f"{task} at {length}: worst relative error {worst:.3f}"


@pytest.mark.parametrize("task", TASKS)
def test_short_contexts_fit(task, count_tokens):
    for s in make_samples(task, 2, 200, count_tokens=count_tokens):
        assert abs(count_tokens(s.context) / 200 - 1) <= 0.05


@pytest.mark.parametrize("task", ("niah_multivalue", "vt", "cwe", "fwe"))
def test_long_contexts_fit(task, count_tokens):
    s = make_samples(task, 1, 16000, count_tokens=count_tokens)[0]
    assert abs(count_tokens(s.context) / 16000 - 1) <= 0.05
    assert all(a in s.context for a in s.answers)


def test_default_counter_is_the_embedded_tokenizer(count_tokens):
    assert make_samples("vt", 2, 700, seed=4) == make_samples("vt", 2, 700, seed=4, count_tokens=count_tokens)


def test_any_counter_or_tokenizer_is_accepted(tok):
    by_words = make_samples("niah_single", 2, 800, count_tokens=lambda t: len(t.split()))
    for s in by_words:
        assert abs(len(s.context.split()) / 800 - 1) <= 0.05
    by_tokenizer = make_samples("fwe", 1, 800, count_tokens=tok)[0]
    assert abs(len(tok.encode(by_tokenizer.context, add_special_tokens=False)) / 800 - 1) <= 0.05
    with pytest.raises(TypeError):
        make_samples("fwe", 1, 800, count_tokens=42)


def test_ten_samples_at_4k_are_fast(count_tokens):
    start = time.perf_counter()
    make_samples("niah_multikey", 10, 4000, seed=11, count_tokens=count_tokens)
    assert time.perf_counter() - start < 3.0


# ---------------------------------------------------------------------------- haystack

def test_haystack_is_varied_prose(count_tokens):
    s = make_samples("niah_single", 1, 4000, seed=0, count_tokens=count_tokens)[0]
    sentences = _sentences(s.context.split("\n\n", 1)[1])
    counts = Counter(sentences)
    assert len(counts) >= 100
    assert counts.most_common(1)[0][1] <= 2
    # different seeds draw different prose, not the same text in the same order
    other = make_samples("niah_single", 1, 4000, seed=1, count_tokens=count_tokens)[0]
    assert _sentences(other.context)[1:6] != _sentences(s.context)[1:6]


def test_haystack_data_is_clean():
    sentences = [x for p in hs.paragraphs() for x in p]
    assert len(sentences) >= 300 and len(set(sentences)) == len(sentences)
    assert all(not re.search(r"\d", x) and "magic" not in x.lower() and "VAR " not in x for x in sentences)
    assert all(x[0].isupper() and x[-1] in ".!?" for x in sentences)
    assert len(hs.adjectives()) >= 100 and len(hs.nouns()) >= 100 and len(hs.value_words()) >= 100
    vocab = hs.haystack_vocabulary()
    assert not any(w in v for w in hs.value_words() for v in vocab)
    key_words = hs.adjectives() + hs.nouns()  # a value word never overlaps a key word
    assert not any(v in k or k in v for v in hs.value_words() for k in key_words)


# ---------------------------------------------------------------------------- determinism and ids

@pytest.mark.parametrize("task", TASKS)
def test_seeded_and_deterministic(task, count_tokens):
    a = make_samples(task, 2, 500, seed=3, count_tokens=count_tokens)
    b = make_samples(task, 2, 500, seed=3, count_tokens=count_tokens)
    c = make_samples(task, 2, 500, seed=4, count_tokens=count_tokens)
    assert a == b
    assert a[0].context != c[0].context and a[0].answers != c[0].answers
    assert a[0].answers != a[1].answers
    assert make_samples(task, 1, 500, seed=3, count_tokens=count_tokens) == a[:1]  # n=1 is a prefix


def test_sample_ids(count_tokens):
    samples = make_samples("niah_single", 3, 500, seed=9, count_tokens=count_tokens)
    assert [s.sample_id for s in samples] == [f"niah_single-500-9-{i}" for i in range(3)]
    uuid_ids = [s.sample_id for s in make_samples("niah_single", 3, 500, seed=9, count_tokens=count_tokens,
                                                  value_kind="uuid")]
    assert len(set(uuid_ids) | {s.sample_id for s in samples}) == 6  # options change the id
    same = make_samples("niah_single", 1, 500, seed=9, count_tokens=count_tokens, value_kind="number")
    assert same[0] == samples[0]  # an option at its default is no change


# ---------------------------------------------------------------------------- validation

def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError) as err:
        make_samples("niah_singel", 1, 500)
    message = str(err.value)
    assert all(t in message for t in TASKS) and "Did you mean 'niah_single'" in message
    with pytest.raises(ValueError, match="known tasks"):
        make_samples("qa_1", 1, 500)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(n=0), "n .*positive integer"),
    (dict(n=2.5), "n .*positive integer"),
    (dict(length=10), r"length .*\[128, 131072\]"),
    (dict(length=10**7), r"length .*\[128, 131072\]"),
    (dict(length="1k"), "length"),
    (dict(num_values=3), "unknown option.*num_distractors"),
    (dict(value_kind="emoji"), "value_kind must be one of number, word, uuid"),
    (dict(num_distractors=-1), "num_distractors"),
])
def test_bad_arguments_say_what_is_allowed(kwargs, pattern, count_tokens):
    args = dict(task="niah_multikey", n=1, length=500, count_tokens=count_tokens) | kwargs
    with pytest.raises(ValueError, match=pattern):
        make_samples(**args)


def test_too_short_for_the_task(count_tokens):
    with pytest.raises(ValueError, match="too short"):
        make_samples("niah_multiquery", 1, 200, count_tokens=count_tokens, num_queries=20)
    with pytest.raises(ValueError, match="freq_common > freq_rare"):
        make_samples("cwe", 1, 500, count_tokens=count_tokens, freq_common=2, freq_rare=2)


def test_task_options():
    assert task_options("niah_multikey") == {"value_kind": "number", "num_distractors": 3}
    assert set(task_options("vt")) == {"num_chains", "num_hops"}


def test_sample_validates_its_fields():
    s = Sample("c", "q", "p", ["a", "b"], 8, "t", "t-0")
    assert s.answers == ("a", "b") and isinstance(s.answers, tuple)
    assert Sample("c", "q", "p", "abc", 8, "t", "t-0").answers == ("abc",)
    with pytest.raises(ValueError, match="metric"):
        Sample("c", "q", "p", ("a",), 8, "t", "t-0", metric="exact")
    with pytest.raises(ValueError, match="answers"):
        Sample("c", "q", "p", (), 8, "t", "t-0")
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sample("c", "q", "p", ("a",), 0, "t", "t-0")


# ---------------------------------------------------------------------------- metrics

def test_string_match_all():
    answers = ("4521973", "8812345", "1000001")
    assert string_match_all("The numbers are 4521973, 8812345 and 1000001.", answers) == 1.0
    assert string_match_all("The numbers are 4521973 and 8812345.", answers) == pytest.approx(2 / 3)
    assert string_match_all("I could not find them.", answers) == 0.0
    assert string_match_all("", answers) == 0.0
    assert string_match_all("Those are QWERT and asdfg", ["qwert", "ASDFG"]) == 1.0
    assert string_match_all("saxophone", "saxophone") == 1.0  # a bare string is one reference


def test_string_match_part():
    assert string_match_part("It is Paris, I think.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It is Marseille.", ["paris", "Lyon"]) == 0.0
    with pytest.raises(ValueError):
        string_match_part("anything", [])
    with pytest.raises(ValueError):
        string_match_all("anything", [" "])


def test_score_sample_dispatches_on_metric(count_tokens):
    s = make_samples("niah_multivalue", 1, 500, count_tokens=count_tokens)[0]
    assert s.metric == "all"
    assert score_sample(s, " ".join(s.answers)) == 1.0
    assert score_sample(s, s.answers[0]) == pytest.approx(1 / len(s.answers))
    assert score_sample(s, "no idea") == 0.0
    part = Sample("c", "q", "p", ("alpha", "beta"), 8, "qa_1", "qa_1-0", metric="part")
    assert score_sample(part, "BETA") == 1.0 and score_sample(part, "gamma") == 0.0


def test_predictions_from_the_answers_score_full_marks(count_tokens):
    for task in TASKS:
        s = make_samples(task, 1, 500, seed=1, count_tokens=count_tokens)[0]
        assert score_sample(s, s.answer_prefix + " " + ", ".join(a.upper() for a in s.answers)) == 1.0
        assert score_sample(s, s.answer_prefix + " nothing useful") == 0.0  # prefix alone earns nothing


# ---------------------------------------------------------------------------- import hygiene

# The same samples are built here and in a fresh interpreter with another string-hash seed.
_SAMPLES = "[make_samples(t, 2, 600, seed=5, count_tokens=lambda x: len(x.split())) for t in TASKS]"


def test_import_is_light_and_samples_match_across_processes():
    code = ("import hashlib, sys, kvray.eval, kvray.eval.tasks as t; "
            "assert 'ray' not in sys.modules, 'ray imported'; "
            "assert 'datasets' not in sys.modules, 'datasets imported'; "
            "assert t._default_tokenizer.cache_info().currsize == 0, 'tokenizer loaded'; "
            f"from kvray.eval import TASKS, make_samples; print(hashlib.sha1(repr({_SAMPLES}).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    here = eval(_SAMPLES, {"make_samples": make_samples, "TASKS": TASKS})
    assert result.stdout.strip() == hashlib.sha1(repr(here).encode()).hexdigest()
