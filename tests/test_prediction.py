"""The cost model for lookup, tree and hybrid rows (bench/prediction.py): each verification after the
first priced as the vanilla forward as run x its cost in 1-row forwards (timed alone) + the row's own
host work per step, against the measured decode-phase speedup; and the host accounting it reads (the
engine's split of each step around LayeredModel.clock)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_loaded
from exitspec.bench.prediction import (
    HEAD,
    VanillaPace,
    hybrid_prediction,
    lookup_prediction,
    tree_prediction,
    vanilla_pace,
)
from exitspec.decoding.api import make_strategy
from exitspec.decoding.sampling import greedy_tokens
from exitspec.heads.bundle import HeadBundle
from exitspec.runtime.profile import interpolate_cost, position_costs, row_costs
from helpers_strategies import greedy


def record(drafts: list[int], accepts: list[int], time_s: float, ttft_s: float, host_s: float = 0.01,
           sources: list[str] | None = None) -> dict:
    return {"draft_lengths": drafts, "accept_lengths": accepts, "new_tokens": sum(a + 1 for a in accepts),
            "time_s": time_s, "ttft_s": ttft_s, "host_s": host_s, "steps": len(accepts), "cycle_sources": sources}


VANILLA = VanillaPace(tokens_per_s=10.0, host_ms=5.0)  # a 100 ms step: 95 ms forward + 5 ms host
PER_PROMPT = [record([3, 3, 0, 2], [0, 3, 0, 1], 1.0, 0.1, host_s=0.04), record([1, 3], [1, 2], 0.5, 0.1, host_s=0.02)]
STEPS = [(3, 3), (0, 0), (2, 1), (3, 2)]  # each prompt's first verification is the first token's: left out
HOST_MS = 1000 * 0.06 / 6  # the rows' host seconds over all their steps, first ones included


def test_lookup_prediction_prices_forwards_and_host_work_apart_and_names_a_gap():
    lm = tiny_loaded("llama").lm
    curve = row_costs(lm, 4)
    cycle_ms = [VANILLA.forward_ms * curve[k] + HOST_MS for k, _ in STEPS]
    predicted = 1000 * sum(a + 1 for _, a in STEPS) / sum(cycle_ms) / VANILLA.tokens_per_s
    out = lookup_prediction(lm, PER_PROMPT, VANILLA)
    assert out["predicted_speedup"] == pytest.approx(predicted)
    assert out["cycle_ms"] == pytest.approx(sum(cycle_ms) / 4) and out["host_ms"] == pytest.approx(HOST_MS)
    assert out["mean_verified_rows"] == pytest.approx(sum(k + 1 for k, _ in STEPS) / 4)
    # the row made 7 + 3 tokens after its first steps in 0.9 + 0.4 s; vanilla 10 tokens/s
    assert out["measured_decode_speedup"] == pytest.approx((10 / 1.3) / 10.0)
    gap = abs(out["measured_decode_speedup"] / predicted - 1)
    assert ("prediction_note" in out) == (gap > 0.10)
    assert "host work" in out["prediction_note"] and "as run" in out["prediction_note"]
    # host work is part of the price: more of it predicts less
    slower = lookup_prediction(lm, [dict(r, host_s=r["host_s"] * 10) for r in PER_PROMPT], VANILLA)
    assert slower["predicted_speedup"] < out["predicted_speedup"]
    assert lookup_prediction(lm, [record([], [], 1.0, 0.1)], VANILLA) == {}
    assert lookup_prediction(lm, PER_PROMPT, None) == {}
    assert lookup_prediction(lm, [dict(r, host_s=None) for r in PER_PROMPT], VANILLA) == {}  # not accounted


def test_tree_prediction_prices_each_tree_on_the_position_cost_table():
    lm = tiny_loaded("llama").lm
    table = position_costs(lm, 4)
    cycle_ms = [VANILLA.forward_ms * interpolate_cost(table, k + 1) + HOST_MS for k, _ in STEPS]
    out = tree_prediction(lm, PER_PROMPT, VANILLA)
    assert out["predicted_speedup"] == pytest.approx(
        1000 * sum(a + 1 for _, a in STEPS) / sum(cycle_ms) / VANILLA.tokens_per_s)


def test_hybrid_prediction_prices_head_cycles_as_timed_self_spec_cycles():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [3], "norm_lm")
    s = make_strategy("hybrid", m, exit_layer=3, draft_len=2, draft_cost=0.05)
    per_prompt = [record([1, 2, 3, 0], [1, 2, 1, 0], 1.0, 0.1, sources=["head", "head", "context3", "none"])]
    out = hybrid_prediction(s, per_prompt, VANILLA, context=32, repeats=2)
    assert out["head_cycles"] == pytest.approx(1 / 3) and out["cost_context"] == 32
    lookup_only = hybrid_prediction(s, [dict(per_prompt[0], cycle_sources=["none"] * 4)], VANILLA, context=32,
                                    repeats=2)
    assert lookup_only["head_cycles"] == 0
    # the same rows as lookup cycles cost 3 and 1 rows; as a head cycle of 2 drafts, draft passes too
    assert out["cycle_ms"] > lookup_only["cycle_ms"]
    assert HEAD == "head"


def test_vanilla_pace_splits_the_step_into_forward_and_host():
    pace = vanilla_pace([record([], [0] * 11, 1.1, 0.1, host_s=0.011)])
    assert pace.tokens_per_s == pytest.approx(10.0) and pace.host_ms == pytest.approx(1.0)
    assert pace.forward_ms == pytest.approx(99.0)
    assert vanilla_pace([record([], [0] * 11, 1.1, 0.1, host_s=None)]) is None


@pytest.mark.parametrize("strategy, opts", [("vanilla", {}), ("lookup", {"draft_len": 3}), ("tree", {}),
                                            ("hybrid", {"exit_layer": 3, "draft_len": 2, "draft_cost": 0.05})])
def test_engine_accounts_each_rows_host_time_outside_the_forwards(strategy, opts):
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [3], "norm_lm")
    before = m.lm.clock.seconds
    t = greedy(m, "abc abc abc abc", n=12, strategy=make_strategy(strategy, m, **opts))
    row = t.stats.rows[0]
    assert m.lm.clock.seconds > before  # the forwards ran inside the clock
    assert 0 < row.host_s < t.stats.decode_s
    assert (len(row.cycle_sources) == row.steps) == (strategy == "hybrid")


def test_greedy_tokens_is_torchs_argmax_ties_and_nans_included():
    x = torch.randn(3, 5, 64)
    x[0, 1, 7] = x[0, 1, 9] = float("nan")
    x[1, 2, 3] = x[1, 2, 5] = 1e3  # a tie: the first wins
    x[2, 0, :] = float("-inf")
    for t in (x, x[:, 1:], x[0, 0], x.double(), x.half()):
        assert torch.equal(greedy_tokens(t), t.argmax(-1))
    assert torch.equal(greedy_tokens(x.bfloat16()), x.bfloat16().argmax(-1))  # numpy has no bf16: torch's
