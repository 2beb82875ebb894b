"""Confidence scores, threshold selection, learned estimators, bundle round trips, calibration errors."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_loaded
from exitspec.calibration.calibrate import calibrate_bundle
from exitspec.calibration.collect import collect, token_metrics
from exitspec.calibration.estimator import EstimatorTrainConfig, auc, cross_fit, train_estimator
from exitspec.calibration.sequences import heldout_prompts
from exitspec.calibration.thresholds import select_threshold
from exitspec.heads.bundle import BundleError, HeadBundle
from exitspec.heads.confidence import SCORE_FEATURES, exit_confidence, is_confident, scores
from exitspec.runtime.sequences import scored_sequence

FAST = EstimatorTrainConfig(steps=60, proj_dim=4, mlp_dim=8)


# --- scores and per-token metrics on hand-made logits ----------------------------------------------
def test_scores_match_formulas():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits, -1)
    s = scores(logits)
    assert torch.allclose(s["max_prob"], p.max(-1).values)
    assert torch.allclose(s["entropy"], -(p * p.log()).sum(-1))
    assert torch.allclose(s["entropy"][1], torch.tensor(math.log(4)))
    assert torch.allclose(s["margin"], torch.tensor([p[0, 0] - p[0, 1], 0.0]))


def test_token_metrics_match_formulas():
    full = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    exit_ = torch.tensor([[1.0, 1.5, 0.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 2])
    m = token_metrics(exit_, torch.log_softmax(full, -1), labels)
    pf, pe = torch.softmax(full, -1), torch.softmax(exit_, -1)
    kl = (pf * (pf.log() - pe.log())).sum(-1)
    assert torch.allclose(m["kl"], kl, atol=1e-6)
    assert torch.allclose(m["ce"], -pe.log()[[0, 1], [0, 2]], atol=1e-6)
    assert m["agree"].tolist() == [False, True]  # exit top-1 = 1, 1; full top-1 = 0, 1
    assert m["correct"].tolist() == [False, False]
    # KL of a distribution with itself is zero.
    assert torch.allclose(token_metrics(full, torch.log_softmax(full, -1), labels)["kl"], torch.zeros(2), atol=1e-6)


def test_top5_and_the_training_temperature_kl():
    full = torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0, 4.0, -1.0], [9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    exit_ = torch.tensor([[6.0, 1.0, 5.0, 4.0, 3.0, 2.0, 0.0], [0.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    labels = torch.tensor([1, 6])
    m = token_metrics(exit_, torch.log_softmax(full, -1), labels, temperature=2.0)
    # exit row 0's top 5: ids 0, 2, 3, 4, 5 (not 1); row 1's: 1..5 (not 0, not 6)
    assert m["agree5"].tolist() == [False, False] and m["correct5"].tolist() == [False, False]
    m = token_metrics(exit_, torch.log_softmax(full, -1), torch.tensor([2, 5]), temperature=2.0)
    assert m["correct5"].tolist() == [True, True]
    pf, pe = torch.softmax(full / 2, -1), torch.softmax(exit_ / 2, -1)
    assert torch.allclose(m["kl_t"], (pf * (pf.log() - pe.log())).sum(-1), atol=1e-6)
    assert not torch.allclose(m["kl_t"], m["kl"])
    assert torch.equal(token_metrics(exit_, torch.log_softmax(full, -1), labels)["kl_t"], m["kl"])


# --- thresholds ------------------------------------------------------------------------------------
def brute_force_coverage(values, agree, target, lower_better=False):
    best = 0.0
    for v in values.unique().tolist():
        acc = values <= v if lower_better else values >= v
        if agree[acc].float().mean() >= target - 1e-12:
            best = max(best, float(acc.float().mean()))
    return best


@pytest.mark.parametrize("score", ["max_prob", "entropy"])
def test_threshold_reaches_target_with_max_coverage(score):
    g = torch.Generator().manual_seed(0)
    n = 2000
    conf = torch.rand(n, generator=g)
    agree = torch.rand(n, generator=g) < conf  # confident tokens agree more often
    values = (conf if score == "max_prob" else 5 * (1 - conf)).float()
    values = (values * 50).round() / 50  # many ties: a threshold must not split them
    for target in (0.8, 0.9, 0.95):
        c = select_threshold(values, agree, target, score)
        acc = values <= c.value if score == "entropy" else values >= c.value
        assert c.coverage == pytest.approx(float(acc.float().mean()))
        assert c.agreement == pytest.approx(float(agree[acc].float().mean()))
        assert c.agreement >= target
        assert c.coverage == pytest.approx(brute_force_coverage(values, agree, target, score == "entropy"))
        assert c.n_tokens == n and c.target_agreement == target
        assert 0 < c.coverage < 1


def test_threshold_unreachable_target_never_fires():
    values = torch.tensor([0.9, 0.8, 0.7])
    agree = torch.tensor([False, True, False])
    c = select_threshold(values, agree, 0.95, "max_prob")
    assert c.coverage == 0.0 and c.agreement is None
    assert not is_confident_value("max_prob", values, c.value).any()
    c = select_threshold(values, agree, 0.95, "entropy")
    assert not is_confident_value("entropy", values, c.value).any()
    # Everything agreeing: accept everything.
    c = select_threshold(values, torch.ones(3, dtype=torch.bool), 1.0, "margin")
    assert c.coverage == 1.0 and c.agreement == 1.0
    # A perfect but tiny accepted set is not trusted.
    values = torch.arange(100.0) / 100
    agree = torch.zeros(100, dtype=torch.bool)
    agree[-5:] = True
    assert select_threshold(values, agree, 0.95, "max_prob").coverage == 0.0
    assert select_threshold(values, agree, 0.95, "max_prob", min_accepted=5).coverage == 0.05


def is_confident_value(score, values, value):
    from exitspec.heads.confidence import confident

    return confident(score, values, value)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01, float("nan")])
def test_bad_target_is_rejected(target):
    with pytest.raises(ValueError, match="target agreement must be in"):
        select_threshold(torch.rand(5), torch.ones(5, dtype=torch.bool), target, "max_prob")


def test_threshold_input_errors():
    with pytest.raises(ValueError, match="non-empty"):
        select_threshold(torch.tensor([]), torch.tensor([], dtype=torch.bool), 0.9, "max_prob")
    with pytest.raises(ValueError, match="unknown confidence score"):
        select_threshold(torch.rand(3), torch.ones(3, dtype=torch.bool), 0.9, "vibes")


# --- learned estimator -----------------------------------------------------------------------------
def synthetic_problem(n=1200, hidden=16, seed=0):
    """Agreement is decided by a direction of the hidden state that no logit score sees."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, len(SCORE_FEATURES), generator=g)
    normed = torch.randn(n, hidden, generator=g)
    labels = (normed[:, 0] + 0.5 * normed[:, 1]) > 0.3
    seq_index = torch.arange(n) // 20  # 60 "sequences"
    return feats, normed, labels, seq_index


def test_learned_estimator_beats_chance_out_of_fold():
    feats, normed, labels, seq = synthetic_problem()
    est, oof, rep = cross_fit(feats, normed.half(), labels, seq, EstimatorTrainConfig(steps=150), hidden_size=16)
    assert rep["oof_auc"] > 0.9  # chance is 0.5
    acc = ((oof > 0.5) == labels).float().mean()
    base = max(labels.float().mean(), 1 - labels.float().mean())
    assert acc > base + 0.15
    # Scores-only features carry no signal here, so a logistic model on them stays near chance.
    est0 = train_estimator(feats, None, labels, EstimatorTrainConfig(steps=150, mlp_dim=0), hidden_size=16)
    assert abs(auc(est0(feats, None), labels) - 0.5) < 0.1


def test_auc_matches_definition():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    y = torch.tensor([False, False, True, True, True])
    pairs = [(a, b) for a in s[y] for b in s[~y]]
    want = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert auc(s, y) == pytest.approx(want)


# --- bundles: calibrate, save, load ----------------------------------------------------------------
def tiny_sequences(model, n=6, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [scored_sequence(torch.randint(0, 95, (length,), generator=g).tolist(), 6) for _ in range(n)]


def test_calibrate_save_load_round_trip(tmp_path):
    m = tiny_loaded("llama")
    bundle = HeadBundle.create(m.lm, [2, 4], "norm_lm", base_model="tiny")
    seqs = tiny_sequences(m)
    data = collect(m.lm, {"h": bundle}, seqs, keep_features=True).exits["h"]
    entries = calibrate_bundle(bundle, data, 0.6, "learned", train=FAST)
    for layer, e in entries.items():
        assert e["score"] == "learned" and e["n_tokens"] == data[layer].n
        assert e["coverage"] == 0 or e["agreement"] >= 0.6
        assert set(bundle.threshold(layer)) >= {"score", "value", "target_agreement", "coverage", "agreement"}
    bundle.save(tmp_path / "b")
    loaded = HeadBundle.load(tmp_path / "b", m.lm)
    assert loaded.config.thresholds == bundle.config.thresholds
    assert loaded.config.estimators == bundle.config.estimators
    ref, got = bundle.state_dict(), loaded.state_dict()
    assert set(ref) == set(got) and any(k.startswith("estimators.4.") for k in got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # The decoders' entry points agree before and after the round trip.
    h = torch.randn(1, 5, m.lm.hidden_size)
    logits = loaded.head(4)(h)
    s_ref = exit_confidence(bundle, 4, h, bundle.head(4)(h))
    s_got = exit_confidence(loaded, 4, h, logits)
    assert torch.equal(s_ref, s_got) and s_got.shape == (1, 5)
    assert torch.equal(is_confident(bundle, 4, s_ref), is_confident(loaded, 4, s_got))


def test_auto_picks_the_best_candidate_and_fixed_scores_need_no_estimator():
    m = tiny_loaded("llama")
    bundle = HeadBundle.create(m.lm, [3], "norm_lm")
    data = collect(m.lm, {"h": bundle}, tiny_sequences(m), keep_features=True).exits["h"]
    e = calibrate_bundle(bundle, data, 0.5, "auto", train=FAST)[3]
    assert e["coverage"] == max(c["coverage"] for c in e["candidates"].values())
    assert set(e["candidates"]) == {"max_prob", "entropy", "margin", "learned"}
    fixed = HeadBundle.create(m.lm, [3], "norm_lm")
    data = collect(m.lm, {"h": fixed}, tiny_sequences(m)).exits["h"]
    e = calibrate_bundle(fixed, data, 0.5, "entropy")[3]
    assert e["score"] == "entropy" and len(fixed.estimators) == 0
    h = torch.randn(2, 3, m.lm.hidden_size)
    logits = fixed.head(3)(h)
    s = exit_confidence(fixed, 3, h, logits)
    assert torch.equal(is_confident(fixed, 3, s), scores(logits)["entropy"] <= e["value"])
    with pytest.raises(ValueError, match="learned"):
        calibrate_bundle(fixed, data, 0.5, "learned")


def test_confidence_errors_are_clear(tmp_path):
    m = tiny_loaded("llama")
    bundle = HeadBundle.create(m.lm, [2], "norm_lm")
    h = torch.randn(1, 2, m.lm.hidden_size)
    logits = bundle.head(2)(h)
    with pytest.raises(ValueError, match="no calibrated threshold"):
        is_confident(bundle, 2, exit_confidence(bundle, 2, h, logits))
    with pytest.raises(ValueError, match="no learned confidence estimator"):
        exit_confidence(bundle, 2, h, logits, score="learned")
    with pytest.raises(BundleError, match="does not exist"):
        HeadBundle.load(tmp_path / "missing", m.lm)
    with pytest.raises(ValueError, match="target agreement"):
        calibrate_bundle(bundle, {}, 1.5)
    with pytest.raises(ValueError, match="no sequences"):
        collect(m.lm, {"h": bundle}, [])
    with pytest.raises(ValueError, match="at least one scored token"):
        scored_sequence([1, 2, 3], 3)


def test_heldout_prompt_parts_are_disjoint(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(f'"prompt number {i}"\n' for i in range(40)))
    cal = heldout_prompts("calibrate", 100, f)
    ev = heldout_prompts("eval", 100, f)
    assert len(cal) == 4 and len(ev) == 4  # held-out = last 8 of 40, split by parity
    assert not {p.text for p in cal} & {p.text for p in ev}
    assert all(int(p.id) >= 32 for p in cal + ev)
    empty = tmp_path / "one.jsonl"
    empty.write_text('"only prompt"\n')
    with pytest.raises(ValueError, match="no held-out prompts for eval"):
        heldout_prompts("eval", 5, empty)
