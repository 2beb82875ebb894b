"""The cost model for lookup rows (bench/prediction.py): each verification's own draft count priced
by the runtime's row-cost curve, against the measured decode-phase speedup."""

from __future__ import annotations

import pytest

from conftest import tiny_loaded
from exitspec.bench.prediction import lookup_prediction
from exitspec.runtime.profile import row_costs


def record(drafts: list[int], accepts: list[int], time_s: float, ttft_s: float) -> dict:
    return {"draft_lengths": drafts, "accept_lengths": accepts, "new_tokens": sum(a + 1 for a in accepts),
            "time_s": time_s, "ttft_s": ttft_s}


def test_lookup_prediction_prices_each_verification_and_names_a_gap():
    lm = tiny_loaded("llama").lm
    per_prompt = [record([3, 3, 0, 2], [0, 3, 0, 1], 1.0, 0.1), record([1, 3], [1, 2], 0.5, 0.1)]
    curve = row_costs(lm, 4)
    steps = [(3, 3), (0, 0), (2, 1), (3, 2)]  # each prompt's first verification is the first token's: left out
    predicted = sum(a + 1 for _, a in steps) / sum(curve[k] for k, _ in steps)
    # vanilla made 10 tokens/s in its decode phase; the row 7 + 3 tokens after its first steps in 0.9 + 0.4 s
    out = lookup_prediction(lm, per_prompt, vanilla_decode_tps=10.0)
    assert out["predicted_speedup"] == pytest.approx(predicted)
    assert out["mean_verified_rows"] == pytest.approx(sum(k + 1 for k, _ in steps) / 4)
    assert out["measured_decode_speedup"] == pytest.approx((10 / 1.3) / 10.0)
    gap = abs(out["measured_decode_speedup"] / predicted - 1)
    assert ("prediction_note" in out) == (gap > 0.10)
    assert lookup_prediction(lm, [record([], [], 1.0, 0.1)], 10.0) == {}
    assert lookup_prediction(lm, per_prompt, None) == {}
