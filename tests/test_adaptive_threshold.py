"""SEDAC's run-time adaptation (decoding/adapt.py) and the range check of gate thresholds."""

from __future__ import annotations

import pytest
import torch

import exitspec
from conftest import tiny_loaded
from exitspec.bench.tasks import TaskScorer
from exitspec.decoding.adapt import MIN_POSITIONS, shift
from exitspec.decoding.api import make_strategy
from exitspec.decoding.exits import StrategyOptionError
from exitspec.heads.bundle import HeadBundle
from exitspec.runtime.sequences import teacher_pass
from helpers_strategies import PROMPTS, greedy, tokens_and_exits, with_heads

# These bundles store no prompt reference: adaptation runs the earlier rule (the blend), with its warning.
pytestmark = pytest.mark.filterwarnings("ignore::exitspec.decoding.adapt.AdaptationFallbackWarning")

# The "easy" prompt is made of characters whose embeddings are scaled up a thousandfold (easy_model):
# at their positions the residual stream is that embedding, the layers' (pre-normed) updates are tiny
# beside it, so exit and full model read the same normed state and agree. The "hard" prompt's
# characters keep their random embeddings, and the layers above the exit change the prediction.
EASY = "the quick brown fox jumps over the lazy dog and then it sleeps all day long"
HARD = "THE_QUICK_BROWN_FOX_JUMPS_OVER_THE_LAZY_DOG,0123456789_TIMES_A_DAY!"  # no scaled character


def easy_model():
    m = tiny_loaded("qwen2")  # untied: scaling an embedding row leaves the LM head alone
    emb = m.lm.model.model.embed_tokens.weight
    ids = sorted(set(m.tokenizer(EASY)["input_ids"]))
    emb[ids] *= 1000.0
    m.heads = HeadBundle.create(m.lm, [2], "norm_lm")
    return m


def exit_agreement(m, text: str, layer: int = 2) -> float:
    """Top-1 agreement of the exit with the full model over the text's positions (teacher-forced)."""
    ids = torch.tensor([m.tokenizer(text)["input_ids"]])
    tp = teacher_pass(m.lm, ids, [layer])
    exit_top = m.heads.head(layer)(tp.hidden[layer]).argmax(-1)
    return float((exit_top == tp.logits.argmax(-1)).float().mean())


def adapted(m, text: str, strategy: str = "cascade", **opts) -> float:
    """The threshold a request with prompt `text` decodes with (its row's own, Gate.row_values)."""
    s = make_strategy(strategy, m, **opts)
    s.adapt_to(m.lm, [m.tokenizer(text)["input_ids"]])
    return row_threshold(s)


def row_threshold(s, row: int = 0) -> float:
    return float((s.exits[0] if s.name == "cascade" else s.exit).gate.row_values[row])


def test_shift_keeps_the_ends_and_moves_towards_the_estimate():
    for score in ("max_prob", "margin", "learned"):
        assert shift(0.7, 0.2, 0.0, score) == 0.7  # alpha 0: off
        assert shift(0.7, 0.2, 0.5, score) < 0.7 < shift(0.7, None, 0.5, score) < 1.0  # easy down, hard up
        assert shift(0.7, 0.2, 1.0, score) == pytest.approx(0.2)  # alpha 1: the prompt's estimate alone
        for end in (0.0, 1.0, 1.3):  # always / never / a calibrated "never" beyond every score
            assert shift(end, 0.2, 0.5, score) == end and shift(end, None, 0.5, score) == end
    # entropy passes below its threshold: an easy prompt raises it, a hard one lowers it; 0 stays
    assert shift(2.0, None, 0.5, "entropy") < 2.0 < shift(2.0, 5.0, 0.5, "entropy")
    assert shift(0.0, 5.0, 0.5, "entropy") == 0.0


@pytest.mark.parametrize("strategy,extra", [("cascade", {"exit_layers": [2]}), ("mlp-skip", {"exit_layer": 2})])
def test_the_adapted_threshold_loosens_on_an_easy_prompt_and_tightens_on_a_hard_one(strategy, extra):
    m = easy_model()
    assert exit_agreement(m, EASY) > 0.9 > 0.5 > exit_agreement(m, HARD)  # the construction holds
    opts = dict(threshold=0.6, adapt=0.5, adapt_target=0.9, precheck_vocab=0, **extra)
    easy, hard = adapted(m, EASY, strategy, **opts), adapted(m, HARD, strategy, **opts)
    assert easy < 0.6 < hard < 1.0
    # The decode itself adapts at the start of the request (prepare), to the same value.
    s = make_strategy(strategy, m, **opts)
    greedy(m, [HARD], n=4, strategy=s)
    assert row_threshold(s) == hard
    # A prompt too short to judge keeps the calibrated threshold (as float32, like every row's).
    assert adapted(m, EASY[: MIN_POSITIONS - 1], strategy, **opts) == float(torch.tensor(0.6))


def test_adaptation_off_or_at_the_ends_reproduces_the_existing_decode_exactly():
    m = with_heads("llama", layers=(2, 4), thresholds={2: 0.3, 4: 0.3})
    for strategy, kw in (("cascade", {}), ("mlp-skip", {"exit_layer": 2})):
        plain = tokens_and_exits(m, PROMPTS, strategy=strategy, **kw)
        off = tokens_and_exits(m, PROMPTS, strategy=strategy, adapt=0.0, **kw)
        assert off == plain, strategy
        a = greedy(m, PROMPTS, strategy=strategy, **kw).stats.layers_per_token
        assert greedy(m, PROMPTS, strategy=strategy, adapt=0, **kw).stats.layers_per_token == a
    # Threshold 1.0: no exit, whether or not the threshold adapts (1.0 is a fixed point): vanilla's tokens.
    ref = greedy(m, PROMPTS).token_ids
    long = [p * 8 for p in PROMPTS]  # long enough to adapt on
    ref_long = greedy(m, long).token_ids
    for adapt in (0.0, 1.0):
        opts = dict(threshold=1.0, adapt=adapt, **({"adapt_target": 0.5} if adapt else {}))
        toks, exits = tokens_and_exits(m, long, strategy="cascade", **opts)
        assert toks == ref_long and {e for row in exits for e in row} == {m.lm.num_layers}
        assert greedy(m, PROMPTS, strategy="mlp-skip", exit_layer=2, **opts).token_ids == ref
        assert adapted(m, long[1], threshold=1.0, adapt=1.0, adapt_target=0.5) == 1.0


def test_teacher_forced_routing_adapts_as_the_decode_does():
    """bench/routing.py reproduces an adapting cascade exactly: the same window of the same prompt."""
    m = tiny_loaded("gpt2")
    m.heads = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    opts = dict(exit_layers=[2, 4], threshold=0.2, score="max_prob", adapt=1.0, adapt_target=0.3)
    scorer = TaskScorer(m, "cascade", **opts)
    prompt = scorer.encode("once upon a time there was a little cache that wanted to be fast")
    out = exitspec.generate(m, None, prompt_ids=[prompt], strategy="cascade", max_new_tokens=24, ignore_eos=True,
                            **opts)
    gen = out.token_ids[0]
    assert len(set(out.stats.exit_histogram)) > 1
    assert scorer.routed_logprobs(prompt + gen, len(prompt)).argmax(-1).tolist() == gen


@pytest.mark.parametrize("opts,match", [
    (dict(threshold=1.5), r"\[0, 1\]"), (dict(threshold=-0.1), r"\[0, 1\]"),
    (dict(threshold=-1.0, score="entropy"), "nats"), (dict(threshold="high"), "number"),
    (dict(threshold=0.5, adapt=1.5), "adapt is the weight"), (dict(threshold=0.5, adapt=True), "adapt"),
    (dict(threshold=0.5, adapt_window=64), "only apply when the threshold adapts"),
    (dict(threshold=0.5, adapt_target=0.9), "only apply when the threshold adapts"),
    (dict(threshold=0.5, adapt=0.5, adapt_window=4), "adapt_window"),
    (dict(threshold=0.5, adapt=0.5, adapt_target=0.0), "adapt_target"),
    (dict(threshold=0.5, adapt=0.5), "pass adapt_target"),  # an uncalibrated exit has no target of its own
])
def test_bad_thresholds_and_adaptation_settings_are_refused(opts, match):
    m = with_heads("llama", layers=(2,))
    for strategy, kw in (("cascade", {"exit_layers": [2]}), ("mlp-skip", {"exit_layer": 2})):
        with pytest.raises(StrategyOptionError, match=match):
            make_strategy(strategy, m, **kw, **opts)


def test_threshold_ranges_per_score_and_probe():
    m = with_heads("llama", layers=(2,))
    make_strategy("cascade", m, exit_layers=[2], threshold=3.0, score="entropy")  # nats: above 1 is fine
    with pytest.raises(StrategyOptionError, match=r"\[0, 1\]"):
        make_strategy("mlp-skip", m, probe="cosine", start_layer=2, threshold=1.2)
    with pytest.raises(StrategyOptionError, match="cosine probe has no calibration"):
        make_strategy("mlp-skip", m, probe="cosine", start_layer=2, adapt=0.5, adapt_target=0.9)
    # A calibrated exit's own target is used when adapt_target is not given.
    m.heads.config.thresholds["2"] = {"score": "max_prob", "value": 0.4, "target_agreement": 0.8}
    assert make_strategy("cascade", m, exit_layers=[2], adapt=0.5).targets == {2: 0.8}
