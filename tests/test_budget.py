"""BudgetPlan validation, serialisation, exact counts; static plans honoured by every scorer."""

import pytest
import torch

import kvray
from kvray.budget import BudgetPlan, round_preserving_sum
from kvray.generate import PromptTokens, prefill
from kvray.presses import make_press


def test_round_preserving_sum():
    assert round_preserving_sum([1.5, 1.5, 1.0], 4) == [2, 1, 1]
    assert round_preserving_sum([0.2, 0.2, 0.2, 0.4], 1) == [0, 0, 0, 1]
    assert sum(round_preserving_sum([3.3] * 7, 23)) == 23
    assert round_preserving_sum([9.0, 9.0], 10, upper=5) == [5, 5]
    with pytest.raises(ValueError):
        round_preserving_sum([1.0, 1.0], 5, upper=2)


def test_plan_validation_messages():
    with pytest.raises(ValueError, match="not rectangular"):
        BudgetPlan(((0.5, 0.5), (0.5,)))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        BudgetPlan(((0.5, 1.2),))
    with pytest.raises(ValueError, match="non-empty"):
        BudgetPlan(())


def test_plan_json_roundtrip_and_id():
    plan = BudgetPlan(((0.2, 0.8), (0.5, 0.5)), name="tuned")
    again = BudgetPlan.from_json(plan.to_json())
    assert again == plan and hash(again) == hash(plan) and again.plan_id == plan.plan_id
    assert plan.compression_ratio == pytest.approx(0.5)
    assert BudgetPlan(((0.2, 0.8), (0.5, 0.6))).plan_id != plan.plan_id


def test_plan_counts_are_exact():
    plan = BudgetPlan(((0.1, 0.9, 0.35), (0.5, 0.25, 0.77)))
    counts = plan.counts(101)
    assert sum(map(sum, counts)) == round(plan.mean_keep * 6 * 101)
    for row, frow in zip(counts, plan.keep):
        for c, f in zip(row, frow):
            assert abs(c - f * 101) < 1.0


@pytest.mark.parametrize("method", ["knorm", "snapkv", "random", "streaming_llm"])
def test_static_per_head_plan_is_honoured_with_real_memory(tiny_llama, method):
    L, H = tiny_llama.num_layers, tiny_llama.num_kv_heads
    keep = tuple(tuple(0.1 + 0.8 * ((i * H + h) % 5) / 4 for h in range(H)) for i in range(L))
    plan = BudgetPlan(keep, name="test")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (150,), generator=g).tolist()
    state = prefill(tiny_llama, PromptTokens(ids[:140], ids[140:], [])).state(False)
    cache = make_press(method, plan=plan).compress(state)
    held = [list(layer.prefix.lengths) for layer in cache.layers]
    assert held == plan.counts(140)
    full = state.kv_bytes()
    assert abs(cache.nbytes() - plan.mean_keep * full) <= 0.02 * full
    with pytest.raises(ValueError, match="disagrees with the plan"):
        make_press(method, plan=plan, compression_ratio=0.9)


def test_plan_of_the_wrong_shape_is_refused(tiny_llama):
    plan = BudgetPlan.uniform(7, 2, 0.5)
    state = prefill(tiny_llama, PromptTokens(list(range(10, 60)), [], [])).state(False)
    with pytest.raises(ValueError, match="7 layers x 2 KV heads; this model has 3 layers x 2"):
        make_press("knorm", plan=plan).compress(state)
