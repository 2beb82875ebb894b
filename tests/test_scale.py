"""The scale check's parts on a tiny shape (the real run is `exitspec bench-scale`, a benchmark)."""

from __future__ import annotations

import pytest

from exitspec.bench.scale import cost_model, extrapolated_cost_model, report, train_case
from exitspec.decoding.spec_costs import expected_speedup, iid_accepted

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)


def test_training_case_streams_and_reports_memory():
    small, large = train_case(TINY, 8, steps=2, exits=(2, 4)), train_case(TINY, 64, steps=2, exits=(2, 4))
    for case in (small, large):
        assert case["steps"] == 2 and case["step_s"] > 0 and case["peak_rss_mib"] >= case["model_built_rss_mib"] > 0
    assert set(large["final_kd"]) == {"2", "4"}


def test_cost_models_whole_and_extrapolated():
    whole = cost_model(TINY, [2, 4], gamma=2, repeats=1)
    assert [r["k"] for r in whole["step_costs"]] == [1, 2, 4, 8] and not whole["extrapolated"]
    for c in whole["cycles"]:
        assert c["cycle_ms"] == pytest.approx(3 * c["draft_layers_ms"] + 2 * (c["draft_step_ms"] - c["draft_layers_ms"])
                                              + c["verify_ms"])
        assert c["predicted_speedup"]["0.9"] == pytest.approx(expected_speedup(c, iid_accepted(0.9, 2)))
    big = extrapolated_cost_model(dict(TINY, num_hidden_layers=12), 3, [4, 8], gamma=2, repeats=1)
    assert big["layers"] == 12 and big["built_layers"] == 3 and big["extrapolated"]
    shallow, deep = big["cycles"]
    assert shallow["draft_layers_ms"] == pytest.approx(deep["draft_layers_ms"] / 2)  # 4 vs 8 layers at one cost
    md = report({"shapes": ["tiny", "tiny-12"], "machine": "m", "command": "exitspec bench-scale",
                 "train": [], "cost_models": {"tiny": whole, "tiny-12": big}})
    assert "3 of its 12 layers built" in md and "alpha 0.9" in md


def test_bench_scale_refuses_impossible_settings(tmp_path, capsys):
    from exitspec.cli import main

    assert main(["bench-scale", "--out", str(tmp_path / "o"), "--exits", "4,99"]) == 2
    assert "exits must lie inside" in capsys.readouterr().err
    assert main(["bench-scale", "--out", str(tmp_path / "o"), "--big-layers", "0"]) == 2
    assert not (tmp_path / "o").exists()
