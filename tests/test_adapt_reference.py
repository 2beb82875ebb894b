"""Run-time adaptation relative to the calibration prompts' reference (calibration/prompt_reference.py,
decoding/adapt.py), and each row of a batch adapting on its own prompt."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from conftest import save_tiny_model
from exitspec.calibration.prompt_reference import add_prompt_references, prompt_references
from exitspec.decoding.adapt import (
    REFERENCE_KEY,
    AdaptationFallbackWarning,
    PromptReference,
    Reference,
    shift,
    to_space,
    window_estimate,
    window_pass,
)
from exitspec.decoding.api import make_strategy
from exitspec.decoding.driver import GenerateConfig
from exitspec.decoding.engine import Engine
from exitspec.decoding.exits import Gate
from exitspec.decoding.sampling import SamplingParams
from exitspec.heads.bundle import HeadBundle
from exitspec.heads.confidence import scores
from helpers_calibration import write_prompt_file
from helpers_strategies import greedy, tokens_and_exits
from test_adaptive_threshold import EASY, HARD, easy_model, exit_agreement, row_threshold

CAL = {"score": "max_prob", "value": 0.6, "target_agreement": 0.9}  # a calibrated exit at layer 2
OPTS = {"cascade": {"exit_layers": [2]}, "mlp-skip": {"exit_layer": 2}}


def ids(m, text: str) -> list[int]:
    return m.tokenizer(text)["input_ids"]


def calibrated(reference_texts: list[str]):
    """easy_model with exit 2 calibrated (CAL) and its prompt reference taken from `reference_texts`."""
    m = easy_model()
    m.heads.config.thresholds["2"] = dict(CAL)
    add_prompt_references(m.lm, m.heads, [ids(m, t) for t in reference_texts])
    return m


def threshold_for(m, text: str, strategy: str = "cascade", **opts) -> float:
    """The threshold a request with prompt `text` decodes with; adapting must not fall back to the blend."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptationFallbackWarning)
        s = make_strategy(strategy, m, adapt=opts.pop("adapt", 0.5), precheck_vocab=0, **OPTS[strategy], **opts)
    s.adapt_to(m.lm, [ids(m, text)])
    return row_threshold(s)


def test_the_reference_shift_in_shift_space():
    ref = Reference(median=to_space(0.3, "max_prob"), ceiling=to_space(0.8, "max_prob"))
    assert shift(0.7, 0.3, 0.5, "max_prob", reference=ref) == 0.7  # reads like the calibration prompts: exact
    z = math.log(0.7 / 0.3) + 0.5 * (to_space(0.1, "max_prob") - ref.median)
    assert shift(0.7, 0.1, 0.5, "max_prob", reference=ref) == pytest.approx(1 / (1 + math.exp(-z)))
    assert shift(0.7, 0.1, 0.5, "max_prob", reference=ref) < 0.7 < shift(0.7, 0.5, 0.5, "max_prob", reference=ref)
    # No cut (censored) and estimates beyond the ceiling are held at the ceiling: bounded, never past 1.
    at_ceiling = shift(0.7, 0.8, 0.5, "margin", reference=ref)
    assert 0.7 < at_ceiling == shift(0.7, None, 0.5, "margin", reference=ref) == shift(0.7, 0.99, 0.5, "margin",
                                                                                       reference=ref) < 1.0
    # A ceiling no calibration prompt reached: an estimate cannot be placed, the threshold stays.
    assert shift(0.7, 0.1, 1.0, "max_prob", reference=Reference(ref.median, None)) == 0.7
    for end in (0.0, 1.0, 1.3):  # always / never / a calibrated "never" stay what they are
        assert shift(end, 0.1, 1.0, "learned", reference=ref) == end
    # entropy passes below its threshold: an easier prompt (a higher cut) raises it; 0 stays
    eref = Reference(median=to_space(1.0, "entropy"), ceiling=to_space(0.5, "entropy"))
    assert shift(2.0, 1.0, 0.5, "entropy", reference=eref) == 2.0
    assert shift(2.0, None, 0.5, "entropy", reference=eref) < 2.0 < shift(2.0, 3.0, 0.5, "entropy", reference=eref)
    assert shift(2.0, None, 0.5, "entropy", reference=eref) == shift(2.0, 0.01, 0.5, "entropy", reference=eref)
    assert shift(0.0, 3.0, 0.5, "entropy", reference=eref) == 0.0
    # Where the blend moves a threshold towards a hard prompt's estimate, a reference as hard keeps it.
    hard = Reference(to_space(0.95, "max_prob"), to_space(0.95, "max_prob"))
    assert shift(0.6, 0.95, 1.0, "max_prob") == pytest.approx(0.95)
    assert shift(0.6, 0.95, 1.0, "max_prob", reference=hard) == shift(0.6, None, 1.0, "max_prob", reference=hard) == 0.6


def estimate(m, text: str) -> float | None:
    """tau_hat of exit 2 (max_prob, CAL's target) on the text's prompt window."""
    wp = window_pass(m.lm, ids(m, text), 32, [2])
    logits = m.heads.head(2)(wp.hidden[2][:, None])[:, 0]
    return window_estimate(scores(logits)["max_prob"], logits.argmax(-1) == wp.full_top, CAL["target_agreement"],
                           "max_prob")


def between(m):
    """easy_model, exit 2 calibrated (CAL), with a reference whose median lies between EASY's and HARD's
    estimates (HARD reaching no cut counts at the ceiling above both)."""
    m.heads.config.thresholds["2"] = dict(CAL)
    z_easy = to_space(estimate(m, EASY), "max_prob")
    hard = estimate(m, HARD)
    z_hard = z_easy + 2.0 if hard is None else to_space(hard, "max_prob")
    assert z_hard > z_easy
    ref = PromptReference(window=32, target=0.9, values={"max_prob": (z_easy + z_hard) / 2},
                          ceiling={"max_prob": z_hard + 1.0}, never={"max_prob": 0.5}, n_prompts=2)
    m.heads.config.thresholds["2"][REFERENCE_KEY] = ref.to_dict()
    return m


@pytest.mark.parametrize("strategy", ["cascade", "mlp-skip"])
def test_an_easy_prompt_lowers_a_hard_one_raises_the_reference_prompt_keeps_the_threshold(strategy):
    m = between(easy_model())
    assert exit_agreement(m, EASY) > 0.9 > 0.5 > exit_agreement(m, HARD)
    assert threshold_for(m, EASY, strategy) < 0.6 < threshold_for(m, HARD, strategy) < 1.0
    for text in (EASY, HARD):  # a prompt that reads exactly like the calibration prompts: no shift at all
        m = calibrated([text])
        assert threshold_for(m, text, strategy) == float(torch.tensor(0.6))
        assert threshold_for(m, text, strategy, adapt=1.0) == float(torch.tensor(0.6))


def test_references_round_trip_through_the_bundle_and_cover_every_score(tmp_path):
    m = calibrated([EASY, HARD])
    entry = m.heads.threshold(2)
    ref = PromptReference.from_dict(entry[REFERENCE_KEY], 2)
    assert (ref.window, ref.target, ref.n_prompts) == (32, 0.9, 2)
    assert set(ref.values) == set(ref.ceiling) == {"max_prob", "entropy", "margin"} and ref.never["max_prob"] == 0.5
    assert ref.values["max_prob"] == ref.ceiling["max_prob"]  # EASY reaches a cut, HARD none: counted at the ceiling
    m.heads.save(tmp_path / "b")
    back = HeadBundle.load(tmp_path / "b", m.lm)
    assert back.config.thresholds == m.heads.config.thresholds  # plain JSON, exactly back
    assert PromptReference.from_dict(back.threshold(2)[REFERENCE_KEY], 2) == ref
    m.heads = back
    s = make_strategy("cascade", m, exit_layers=[2], adapt=0.5)
    assert s.references == {2: Reference(ref.values["max_prob"], ref.ceiling["max_prob"])}
    # A damaged entry: a clear error naming the way out.
    back.config.thresholds["2"][REFERENCE_KEY] = {"window": 32, "target": 0.9}
    with pytest.raises(ValueError, match="exitspec calibrate --reference-only"):
        make_strategy("cascade", m, exit_layers=[2], adapt=0.5)


def test_a_bundle_without_a_matching_reference_adapts_by_the_blend_and_says_so(tmp_path):
    m = easy_model()
    m.heads.config.thresholds["2"] = dict(CAL)  # calibrated before references existed
    m.heads.save(tmp_path / "old")
    m.heads = HeadBundle.load(tmp_path / "old", m.lm)
    with pytest.warns(AdaptationFallbackWarning, match="exitspec calibrate --reference-only"):
        s = make_strategy("cascade", m, exit_layers=[2], adapt=0.5, precheck_vocab=0)
    assert s.references == {2: None}
    s.adapt_to(m.lm, [ids(m, EASY)])
    blended = row_threshold(s)
    assert blended < 0.6
    # A reference for another window or target is not used either.
    add_prompt_references(m.lm, m.heads, [ids(m, EASY), ids(m, HARD)], window=48)
    for opts in (dict(), dict(adapt_window=48, adapt_target=0.8)):
        with pytest.warns(AdaptationFallbackWarning, match="window 48"):
            s = make_strategy("cascade", m, exit_layers=[2], adapt=0.5, **opts)
        assert s.references == {2: None}
    assert threshold_for(m, EASY, adapt_window=48) != blended  # the matching one is


def test_reference_settings_are_checked():
    m = easy_model()
    with pytest.raises(ValueError, match="calibrate it first"):
        prompt_references(m.lm, m.heads, [ids(m, EASY)])  # no exit calibrated to a target
    m.heads.config.thresholds["2"] = dict(CAL)
    with pytest.raises(ValueError, match="integer >= 16"):
        prompt_references(m.lm, m.heads, [ids(m, EASY)], window=8)
    with pytest.raises(ValueError, match="longer prompts"):
        prompt_references(m.lm, m.heads, [ids(m, "short")])


def test_a_gate_compares_each_row_with_its_own_threshold():
    g = Gate("max_prob", 0.5).with_rows([0.2, 0.9, 1.0])
    v = torch.tensor([0.5, 0.5, 1.0])
    logits = torch.log(torch.stack([torch.tensor([p, 1 - p]) for p in v]).clamp_min(1e-9))
    assert g.passes(logits).tolist() == [True, False, False]  # 1.0 never exits, even a score of 1
    assert g.select_rows([1, 0]).passes(logits[[0, 1]]).tolist() == [False, True]
    one = g.select_rows([0])  # one row's threshold over a text's positions (teacher-forced routing)
    assert one.passes(logits).tolist() == [True, True, True]


def test_a_rows_adapted_output_does_not_depend_on_the_other_rows_of_its_batch():
    m = between(easy_model())
    # max_deferred=3: a row's run of exited tokens is cut short by its own count only, not by the other
    # row going deep (which flushes the shared backlog).
    opts = dict(exit_layers=[2], adapt=1.0, precheck_vocab=0, max_deferred=3)
    prompts = [EASY, HARD]
    alone = [tokens_and_exits(m, [p], n=24, strategy="cascade", **opts) for p in prompts]
    toks, exits = tokens_and_exits(m, prompts, n=24, strategy="cascade", **opts)
    assert toks == [t[0][0] for t in alone] and exits == [t[1][0] for t in alone]
    assert any(e == 2 for e in exits[0]) and any(e != 2 for e in exits[0])  # some tokens exit, some go deep
    alone = [t[0][0] for t in alone]
    # ... though the two rows do adapt to different thresholds, and the other row's would change them.
    s = make_strategy("cascade", m, **opts)
    s.adapt_to(m.lm, [ids(m, p) for p in prompts])
    easy_t, hard_t = row_threshold(s, 0), row_threshold(s, 1)
    assert easy_t < 0.6 < hard_t
    assert greedy(m, [EASY], n=24, strategy="cascade", exit_layers=[2], threshold=hard_t,
                  max_deferred=3).token_ids[0] != alone[0]


def test_mlp_skip_rows_joining_and_leaving_a_batch_keep_their_own_thresholds():
    m = between(easy_model())
    solo = [threshold_for(m, t, "mlp-skip") for t in (EASY, HARD)]
    s = make_strategy("mlp-skip", m, exit_layer=2, adapt=0.5, precheck_vocab=0)
    engine = Engine(m.lm, m.tokenizer, s, heads=m.heads, max_rows=4)
    engine.add(ids(m, EASY), GenerateConfig(max_new_tokens=6, sampling=SamplingParams(), ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.add(ids(m, HARD), GenerateConfig(max_new_tokens=20, sampling=SamplingParams(), ignore_eos=True))
    seen = []
    while engine.busy:
        engine.step()
        seen.append(s.exit.gate.row_values.tolist())
    assert solo[0] < solo[1]
    assert solo in seen  # the joining row adapted its own threshold beside the running row's
    assert seen[-1] == solo[1:]  # the first row left; the second kept its own


def test_calibrate_stores_references_and_reference_only_keeps_the_thresholds(tmp_path):
    from exitspec.cli import main

    model_dir = save_tiny_model(tmp_path / "tiny")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl", 20)
    common = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "8", "--threads", "1"]
    cal = tmp_path / "cal"
    assert main(["calibrate", "--heads", "norm_lm:2,4", "--target", "0.5", "--score", "max_prob", "--out", str(cal),
                 *common]) == 0
    before = json.loads((cal / "bundle.json").read_text())
    assert {PromptReference.from_dict(e[REFERENCE_KEY], 0).window for e in before["thresholds"].values()} == {32}
    out = tmp_path / "ref"
    assert main(["calibrate", "--heads", str(cal), "--reference-only", "--adapt-window", "16", "--out", str(out),
                 *common]) == 0
    after = json.loads((out / "bundle.json").read_text())
    assert PromptReference.from_dict(after["thresholds"]["4"][REFERENCE_KEY], 4).window == 16
    for cfg in (before, after):
        for entry in cfg["thresholds"].values():
            entry.pop(REFERENCE_KEY)
    assert after == before  # thresholds, estimators and everything else exactly as they were
    assert (out / "heads.safetensors").read_bytes() == (cal / "heads.safetensors").read_bytes()
    assert main(["calibrate", "--heads", str(cal), "--reference-only", "--adapt-window", "4", "--out",
                 str(tmp_path / "bad"), *common]) == 2
