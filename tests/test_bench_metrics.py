"""Benchmark metrics against their formulas, on hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch

from exitspec.bench import metrics


def test_overlap_and_tv_on_hand_made_distributions():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.6, 0.2, 0.1])
    # sum min = 0.1 + 0.3 + 0.2 + 0.0 = 0.6; TV = 0.4 = 0.5 * (0.4 + 0.3 + 0 + 0.1)
    assert metrics.overlap(p, q).item() == pytest.approx(0.6)
    assert metrics.total_variation(p, q).item() == pytest.approx(0.4)
    assert metrics.total_variation(p, q).item() == pytest.approx(0.5 * (p - q).abs().sum().item())
    assert metrics.overlap(p, p).item() == pytest.approx(1.0)
    batch = torch.stack([p, q])
    assert metrics.overlap(batch, batch.flip(0)).tolist() == pytest.approx([0.6, 0.6])


def test_kl_and_nll_match_their_definitions():
    a = torch.tensor([[2.0, 0.0, -1.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    p, q = a.softmax(-1)[0], b.softmax(-1)[0]
    expected = sum(float(p[i] * math.log(p[i] / q[i])) for i in range(3))
    assert metrics.kl_divergence(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert metrics.kl_divergence(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.nll(a, torch.tensor([0])).item() == pytest.approx(-math.log(p[0].item()), rel=1e-5)
    assert metrics.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert math.isnan(metrics.perplexity(0.0, 0))


def test_acceptance_states_the_plus_one_token():
    # Three verifications accepting 3, 1, 2 drafts of gamma = 4 each (12 drafted).
    acc = metrics.acceptance([3, 1, 2], drafted=12)
    assert acc["mean_accepted"] == pytest.approx(2.0)
    assert acc["gamma_mean"] == pytest.approx(4.0)
    assert acc["acceptance_rate"] == pytest.approx(0.5)
    assert acc["mean_accept_length"] == pytest.approx(3.0)  # E[accepted] + the verifier's own token
    assert metrics.acceptance([], 0)["mean_accepted"] is None
    assert metrics.calls_per_token(25, 100) == pytest.approx(0.25)
    assert metrics.calls_per_token(None, 100) is None
    assert metrics.layers_per_token(300.0, 10) == pytest.approx(30.0)
    assert metrics.merge_histograms([{"8": 3, 30: 1}, {8: 2}]) == {8: 5, 30: 1}


def test_agreement_and_first_mismatch():
    ref = [1, 2, 3, 4]
    assert metrics.token_agreement([1, 2, 3, 4], ref) == 1.0
    assert metrics.token_agreement([1, 9, 3, 4], ref) == 0.75
    assert metrics.token_agreement([1, 2], ref) == 0.5  # missing tokens count as wrong
    assert metrics.first_mismatch([1, 2, 3, 4], ref) is None
    assert metrics.first_mismatch([1, 9, 3, 4], ref) == 1
    assert metrics.first_mismatch([1, 2, 3], ref) == 3


def test_throughput_speedup_median():
    assert metrics.throughput([10, 30], [1.0, 3.0]) == pytest.approx(10.0)
    assert metrics.speedup(15.0, 10.0) == pytest.approx(1.5)
    assert metrics.speedup(15.0, None) is None
    assert metrics.median([3.0, 1.0, 2.0]) == 2.0


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    vals = [0.2, 0.4, 0.6, 0.8, 1.0, 0.5, 0.7]
    point, lo, hi = metrics.bootstrap_ci(vals, n_boot=500, seed=1)
    assert point == pytest.approx(sum(vals) / len(vals))
    assert lo < point < hi
    assert min(vals) <= lo and hi <= max(vals)
    assert metrics.bootstrap_ci(vals, n_boot=500, seed=1) == (point, lo, hi)
    assert metrics.bootstrap_ci([0.3], n_boot=500) == (0.3, 0.3, 0.3)
    # A pooled statistic over (nll, count) pairs, as used for perplexity.
    pairs = [(math.log(2.0) * 4, 4), (math.log(2.0) * 6, 6)]
    stat = lambda ps: metrics.perplexity(sum(a for a, _ in ps), sum(b for _, b in ps))
    assert metrics.bootstrap_ci(pairs, n_boot=50, stat=stat)[0] == pytest.approx(2.0)


def test_final_numbers_and_answer_agreement_follow_gsm8ks_convention():
    from exitspec.bench.metrics import answer_agreement, final_number

    assert final_number("so 3 + 4 = 7.\n#### 1,234") == "1234"
    assert final_number("It costs $18.0 in total") == "18" and final_number("-5 degrees") == "-5"
    assert final_number("no digits here") is None
    assert answer_agreement("The answer is 42", "... so #### 42") is True
    assert answer_agreement("The answer is 41", "#### 42") is False
    assert answer_agreement("42", "I cannot tell") is None  # nothing to agree with


def test_datastore_facts_count_the_corpus_and_index_and_time_real_proposals():
    from conftest import tiny_loaded
    from exitspec.bench.datastore_facts import describe, measure_datastore
    from exitspec.heads.bundle import HeadBundle

    m = tiny_loaded("llama", layers=2)
    assert measure_datastore(m, [[1, 2, 3]]) is None  # no heads: nothing to report
    m.heads = HeadBundle.create(m.lm, [1], "norm_lm")
    corpus = [[5, 6, 7, 8, 9], [5, 6, 7, 1]]
    m.heads.set_draft_corpus(corpus, source="test answers")
    facts = measure_datastore(m, [[4, 5, 6, 7, 5, 6], [9, 9]])
    assert facts["tokens"] == 9 and facts["sequences"] == 2 and facts["source"] == "test answers"
    # 4-grams with a continuation: 5678 (-> 9) only; 3-grams 567 (one key, two continuations), 678;
    # 2-grams 56, 67, 78.
    assert facts["keys"] == {"4": 1, "3": 2, "2": 3}
    assert facts["proposals_timed"] >= 2000 and 0 <= facts["hit_rate"] <= 1 and facts["lookup_us"] > 0
    assert "9 tokens from test answers" in describe(facts)


def test_answers_end_at_the_first_eos():
    from exitspec.bench.metrics import until_eos

    assert until_eos([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert until_eos([5, 6], {2}) == [5, 6] and until_eos([2], {2, 3}) == []
