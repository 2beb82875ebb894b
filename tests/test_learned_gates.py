"""The learned confidence estimator that calibration trains, used as the gate of cascade, mlp-skip
and dssd: both the estimator over the exit's scores + hidden state and the one over the hidden state
alone, which decides before the exit's LM head runs.

The defect this guards: `exitspec calibrate --score auto` could pick "learned" for an exit, and then
every gated strategy refused the calibrated bundle ("score 'learned' is not one of ...").
"""

from __future__ import annotations

import pytest
import torch

import exitspec
from conftest import tiny_loaded
from exitspec.calibration.calibrate import calibrate_bundle
from exitspec.calibration.collect import collect
from exitspec.calibration.estimator import EstimatorTrainConfig
from exitspec.decoding.exits import CheckedExit, StrategyOptionError, gates_for
from exitspec.heads.bundle import HeadBundle
from exitspec.heads.confidence import estimator_score, learned_score
from helpers_strategies import greedy, tokens_and_exits
from test_calibration import tiny_sequences

INPUTS = ["scores+hidden", "hidden"]
LAYERS = [2, 4]
PROMPTS = ["hello there", "a", "The quick brown fox"]


def learned_model(inputs: str, target: float = 0.6):
    """A tiny llama with norm_lm exits at LAYERS, calibrated with learned estimators of `inputs`."""
    m = tiny_loaded("llama")
    bundle = HeadBundle.create(m.lm, LAYERS, "norm_lm", base_model="tiny")
    data = collect(m.lm, {"h": bundle}, tiny_sequences(m, n=8), keep_features=True).exits["h"]
    train = EstimatorTrainConfig(steps=60, proj_dim=4, mlp_dim=8, inputs=inputs)
    for layer, e in calibrate_bundle(bundle, data, target, "learned", train=train).items():
        assert e["score"] == "learned", layer
    m.heads = bundle
    return m


@pytest.mark.parametrize("inputs", INPUTS)
def test_checked_exit_decides_as_the_estimator_does(inputs):
    m = learned_model(inputs)
    bundle = m.heads
    torch.manual_seed(0)
    h = torch.randn(64, m.lm.hidden_size) * 3
    for layer in LAYERS:
        gate = gates_for(bundle, [layer], strategy="cascade")[layer]
        assert gate.score == "learned" and gate.needs_logits == (inputs != "hidden")
        head = bundle.head(layer)
        want = estimator_score(bundle.estimators[str(layer)], head, h, head(h)) >= gate.value
        assert torch.equal(want, learned_score(bundle, layer, h[None], head(h)[None])[0] >= gate.value)
        ok, logits = CheckedExit(head, gate).confident(h)
        assert torch.equal(ok, want)
        if bool(ok.any()):
            assert torch.equal(logits, head(h[:, None])[:, 0])
        # Over a frequent-token pre-check the gate can only send tokens deeper.
        pre, _ = CheckedExit(head, gate, torch.arange(0, 96, 2)).confident(h)
        assert not bool((pre & ~want).any())
        if inputs == "hidden":  # decided before the head: the pre-check changes nothing
            assert torch.equal(pre, want)


class CountingHead:
    """An exit head that counts its calls (to show a hidden-state gate skips it)."""

    def __init__(self, head):
        self.head, self.layer, self.calls = head, head.layer, 0

    def __call__(self, h):
        self.calls += 1
        return self.head(h)


def test_a_hidden_state_gate_never_runs_the_head_for_rows_that_stay():
    m = learned_model("hidden")
    gate = gates_for(m.heads, [2], threshold=1.0, strategy="cascade")[2]  # no row ever passes
    counted = CountingHead(m.heads.head(2))
    ok, logits = CheckedExit(counted, gate).confident(torch.randn(4, m.lm.hidden_size))
    assert not bool(ok.any()) and logits is None and counted.calls == 0
    scores_gate = gates_for(learned_model("scores+hidden").heads, [2], threshold=1.0, strategy="cascade")[2]
    ok, _ = CheckedExit(counted, scores_gate).confident(torch.randn(4, m.lm.hidden_size))
    assert not bool(ok.any()) and counted.calls == 1  # a gate over the logits must compute them


@pytest.mark.parametrize("inputs", INPUTS)
def test_gated_strategies_run_on_learned_gates(inputs):
    m = learned_model(inputs)
    ref = greedy(m, PROMPTS).token_ids
    # Never confident: every token goes to the top, so the lossy modes equal vanilla decoding.
    for strategy in ("cascade", "mlp-skip"):
        toks, exits = tokens_and_exits(m, PROMPTS, strategy=strategy, threshold=1.0)
        assert toks == ref, strategy
    _, exits = tokens_and_exits(m, PROMPTS, strategy="cascade", threshold=1.0)
    assert {e for row in exits for e in row} == {m.lm.num_layers}
    # Always confident: every cascade token leaves at the first exit, every mlp-skip step skips.
    _, exits = tokens_and_exits(m, PROMPTS, strategy="cascade", threshold=0.0, max_deferred=64)
    assert {e for row in exits for e in row} == {LAYERS[0]}
    r = exitspec.generate(m, PROMPTS, chat=False, max_new_tokens=12, ignore_eos=True, strategy="mlp-skip",
                          threshold=0.0)
    assert r.stats.layers_per_token < m.lm.num_layers
    # Calibrated: the bundle's own learned thresholds, with the score named in the description.
    for strategy in ("cascade", "mlp-skip", "dssd"):
        out = greedy(m, PROMPTS, strategy=strategy)
        assert len(out.token_ids) == len(PROMPTS) and all(len(t) == 24 for t in out.token_ids)
    # dssd is lossless whatever its gates say.
    for threshold in (None, 0.0, 0.5):
        assert greedy(m, PROMPTS, strategy="dssd", threshold=threshold).token_ids == ref


def test_learned_gate_errors_are_clear():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2], "norm_lm")
    with pytest.raises(StrategyOptionError, match="no learned confidence estimator"):
        greedy(m, PROMPTS[:1], strategy="cascade", exit_layers=[2], score="learned", threshold=0.5)
    with pytest.raises(ValueError, match="needs proj_dim > 0"):  # refused before any calibration work
        EstimatorTrainConfig(proj_dim=0, inputs="hidden")
    with pytest.raises(ValueError, match="estimator inputs 'logits' is not one of"):
        EstimatorTrainConfig(inputs="logits")


def test_a_hidden_state_estimator_survives_a_bundle_round_trip(tmp_path):
    m = learned_model("hidden")
    m.heads.save(tmp_path / "b")
    loaded = HeadBundle.load(tmp_path / "b", m.lm)
    assert loaded.config.estimators["2"]["inputs"] == "hidden"
    h = torch.randn(1, 5, m.lm.hidden_size)
    for layer in LAYERS:
        assert torch.equal(learned_score(loaded, layer, h, None), learned_score(m.heads, layer, h, None))
