"""Hybrid drafting (context / datastore copies where an n-gram matches, exit-head drafts where none
does, chosen per row and cycle) is lossless: greedy equals vanilla token for token, sampling follows
the model's distribution, and rows joining a running batch get their solo output."""

from __future__ import annotations

import pytest
import torch

import exitspec
from conftest import FAMILIES, VOCAB, tiny_loaded
from exitspec.decoding.api import make_strategy
from exitspec.decoding.engine import Engine
from exitspec.decoding.events import TokenEvent
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.sampling import SamplingParams, probs
from exitspec.decoding.strategies.hybrid import HEAD, NONE, PROBE_EVERY, Hybrid, Plan, draft_cost_estimate
from exitspec.heads.bundle import BundleError, HeadBundle
from helpers_strategies import PROMPTS, greedy, with_heads
from test_engine import config, fused_fp16_model, ids, join_on_the_fused_stack, run, solo

pytestmark = pytest.mark.filterwarnings("ignore::exitspec.decoding.api.NoHeadsWarning")  # logit-lens drafts


def hybrid(m, **options) -> Hybrid:
    return make_strategy("hybrid", m, **options)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exit_layer, draft_len, lookup_len, draft_cost", [(1, 1, 1, None), (4, 4, 2, 0.05)])
def test_greedy_equals_vanilla_batch_and_single(family, exit_layer, draft_len, lookup_len, draft_cost):
    m = tiny_loaded(family)
    ref = greedy(m, PROMPTS, n=30)
    opts = dict(exit_layer=exit_layer, draft_len=draft_len, lookup_len=lookup_len, draft_cost=draft_cost)
    s = hybrid(m, **opts)
    out = greedy(m, PROMPTS, n=30, strategy=s)
    assert out.token_ids == ref.token_ids  # a ragged batch of 4: rows with and without context matches
    one = greedy(m, PROMPTS[3], n=30, strategy=hybrid(m, **opts))
    assert one.token_ids[0] == ref.token_ids[3]  # batch 1
    st, u = out.stats, s.usage
    assert 0 < st.accepted <= st.drafted and st.new_tokens == sum(len(t) for t in out.token_ids)
    assert u["lookup"]["cycles"] > 0 and sum(v["accepted"] for v in u.values()) == st.accepted
    if draft_cost is None:  # drafts cost their weights: tiny random models loop, so copies pay
        assert u["lookup"]["accepted"] > 0
    else:  # cheap head drafts: rows draft from the head, in the same verification as the copying rows
        assert u[HEAD]["accepted"] > 0 and s.cycles["mixed"] > 0


def test_a_perfect_block_head_drafts_after_lookup_cycles_and_stays_lossless():
    """A block head (its own keys / values, caught up from the states kept at its exit) that is an
    untuned copy of the last layer drafts exactly the model's tokens: every head draft is accepted,
    which needs its states right at the positions that lookup's one-pass cycles ran."""
    m = tiny_loaded("llama")
    L = m.lm.num_layers
    m.heads = HeadBundle.create(m.lm, [L - 1], "block", base_model=m.name, init="copy")
    ref = greedy(m, PROMPTS, n=30)
    s = hybrid(m, exit_layer=L - 1, draft_len=3, draft_cost=0.3)
    assert greedy(m, PROMPTS, n=30, strategy=s).token_ids == ref.token_ids
    for i, prompt in enumerate(PROMPTS):
        assert greedy(m, prompt, n=30, strategy=s).token_ids[0] == ref.token_ids[i]
    assert s.cycles["lookup"] > 0 and s.cycles[HEAD] > 0
    assert s.usage[HEAD]["accepted"] == s.usage[HEAD]["drafted"] > 0


def test_the_choice_follows_expected_tokens_per_unit_of_cost():
    m = tiny_loaded("llama")
    s = hybrid(m, exit_layer=3, draft_len=3, lookup_len=3, min_ngram=2, draft_cost=0.2)
    row = s.new_row()
    matched, unmatched = [7, 8, 9, 1, 7, 8], [1, 2, 3, 4]
    # Neutral priors: 3 copied drafts (1 + 0.875 tokens for one forward) beat 3 head drafts (1.875 / 1.6).
    assert (p := s.plan(row, matched)).source == "context2" and p.drafts == [9, 1, 7]
    assert s.plan(row, unmatched).source == HEAD  # no match: the head's 1.5 / 1.2 beats a plain 1
    for _ in range(30):
        row.head.update(HEAD, 3, 3)  # every head draft accepted, every copied one rejected
        row.lookup.update("context2", 3, 0)
    assert s.plan(row, matched).source == HEAD and s.plan(row, matched).k == 3
    for _ in range(200):
        row.head.update(HEAD, 1, 0)  # now the head is always wrong
    assert s.plan(row, unmatched).source == NONE  # drafting would cost more than it brings
    row.idle = PROBE_EVERY
    assert (p := s.plan(row, unmatched)).source == HEAD and p.k == 1 and p.probe  # a probe keeps it measured
    # The default cost: the weights a draft reads over a forward's, below 1 and rising with the exit.
    costs = [draft_cost_estimate(m.lm, hybrid(m, exit_layer=e).drafter) for e in (1, 3, 5)]
    assert 0 < costs[0] < costs[1] < costs[2] < 1


def test_a_batch_shares_one_cycle_and_greedy_rows_follow_its_cost():
    m = tiny_loaded("llama")
    s = hybrid(m, exit_layer=3, draft_len=2, draft_cost=0.1)
    s.rows = [s.new_row() for _ in range(4)]
    head, none = Plan(HEAD, [], 2, 0.3), Plan(NONE, [], 0)
    copy = [Plan("context3", [5, 6, 7], 3, 2.5) for _ in range(3)]
    # One greedy row's weak head drafts would make three copying rows wait for a 1.2-forward cycle: dropped.
    assert [p.source for p in s.share_cycle([head, *copy], [True] * 4)] == [NONE] + ["context3"] * 3
    # A sampled row keeps its head drafts whoever shares its batch (its seeded draws depend on them).
    assert [p.source for p in s.share_cycle([head, *copy], [False, True, True, True])] == [HEAD] + ["context3"] * 3
    # When a head cycle runs, greedy rows with nothing to draft ride along with the head's drafts;
    # sampled ones do not.
    strong = Plan(HEAD, [], 2, 1.9)
    out = s.share_cycle([strong, none, none, copy[0]], [True, True, False, True])
    assert [(p.source, p.k) for p in out] == [(HEAD, 2), (HEAD, 2), (NONE, 0), ("context3", 3)]


def _p_next(m, ids_, params):
    with torch.inference_mode():
        cache = m.lm.new_cache(1, len(ids_) + 1)
        return probs(m.lm.forward(torch.tensor([ids_]), torch.arange(len(ids_))[None], cache)[0, -1], params)


def _close(samples: torch.Tensor, p: torch.Tensor) -> bool:
    emp = torch.bincount(samples, minlength=VOCAB).float() / len(samples)
    return bool(torch.all((emp - p).abs() <= 5 * (p * (1 - p) / len(samples)).sqrt() + 2e-3))


def test_sampled_tokens_follow_the_model_distribution_with_both_sources_in_one_batch():
    """1500 rows that copy a draft and 1500 that draft from the exit head, in one batch: each row's
    first two sampled tokens follow the model's own p."""
    m = tiny_loaded("llama")
    params = SamplingParams(temperature=1.5, top_k=8)
    t = next(t for t in range(VOCAB) if 0.1 < _p_next(m, [5, 6, t, 5, 6], params)[t] < 0.9)
    copying, fresh = [5, 6, t, 5, 6], [11, 12, 13, 14]  # a 2-gram match proposes "t 5"; no match in the other
    N = 1500
    s = hybrid(m, exit_layer=1, draft_len=2, lookup_len=2, min_ngram=2, draft_cost=0.05)
    out = exitspec.generate(m, None, prompt_ids=[copying] * N + [fresh] * N, chat=False, max_new_tokens=2,
                            ignore_eos=True, temperature=1.5, top_k=8, seed=3, strategy=s)
    toks = torch.tensor(out.token_ids)  # (2N, 2)
    assert s.cycles["mixed"] > 0 and s.usage[HEAD]["drafted"] > 0 and s.usage["lookup"]["drafted"] > 0
    assert 0 < out.stats.accepted < out.stats.drafted  # accept and reject both ran
    for rows, prompt in ((toks[:N], copying), (toks[N:], fresh)):
        assert _close(rows[:, 0], _p_next(m, prompt, params))
        first = int(rows[:, 0].mode().values)  # given the commonest first token, the second follows p too
        assert _close(rows[rows[:, 0] == first, 1], _p_next(m, prompt + [first], params))


OPTIONS = {"exit_layer": 3, "draft_len": 2, "lookup_len": 3, "draft_cost": 0.1}  # cheap: both sources run


@pytest.fixture(scope="module")
def model():
    return with_heads("llama")


def test_rows_with_their_own_sampling_settings_give_their_solo_output(model):
    texts = ["hello there", "a much longer prompt than the others", "medium prompt", "x"]
    settings = [dict(), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_p=0.8, seed=11), dict()]
    limits = [18, 14, 20, 9]
    engine = Engine(model.lm, model.tokenizer, make_strategy("hybrid", model, **OPTIONS), heads=model.heads,
                    max_rows=4)
    rows = [engine.add(ids(model, t), config(n, **s)) for t, n, s in zip(texts, limits, settings, strict=True)]
    done = run(engine)
    for r, t, n, s in zip(rows, texts, limits, settings, strict=True):
        assert done[r].token_ids == solo(model, t, n, "hybrid", OPTIONS, **s), (t, s)
        assert done[r].stats.batch_peak == 4
    assert engine.strategy.cycles["mixed"] > 0


def test_rows_joining_mid_decode_get_their_solo_output(model):
    """B arrives after A has decoded a few steps, C while B prefills or decodes; a cancelled row leaves
    at once; every other row equals its solo decode (one greedy, one seeded sampled)."""
    engine = Engine(model.lm, model.tokenizer, make_strategy("hybrid", model, **OPTIONS), heads=model.heads,
                    max_rows=4, prefill_tokens=5)  # prompts prefilled in chunks between decode steps
    tokens: dict[int, list[int]] = {}

    def step() -> None:
        for ev in engine.step():
            if isinstance(ev, TokenEvent):
                tokens.setdefault(ev.row, []).extend(ev.token_ids)

    a = engine.add(ids(model, "abc abc abc"), config(20))
    gone = engine.add(ids(model, "leaves early"), config(30))
    for _ in range(12):  # both prefilled (in chunks), then decoding together
        if len(engine.rows) == 2:
            break
        step()
    step()
    assert len(engine.rows) == 2
    engine.cancel(gone)
    step()
    assert len(engine.strategy.rows) == engine.state.cache.batch == 1  # the cancelled row's state went at once
    b = engine.add(ids(model, "a much longer prompt than the others, long enough for chunks"),
                   config(12, temperature=0.9, seed=5))
    step()
    c = engine.add(ids(model, "x"), config(16))
    while engine.busy:
        step()
    assert tokens[a] == solo(model, "abc abc abc", 20, "hybrid", OPTIONS)
    assert tokens[b] == solo(model, "a much longer prompt than the others, long enough for chunks", 12, "hybrid",
                             OPTIONS, temperature=0.9, seed=5)
    assert tokens[c] == solo(model, "x", 16, "hybrid", OPTIONS)


def test_on_the_fused_int4_stack_rows_join_and_stay_lossless(kernel_isa):
    """test_engine's join loop (each row equal to its solo output) with hybrid, whose cycles drafted
    from both sources."""
    s = join_on_the_fused_stack(fused_fp16_model(), "hybrid", OPTIONS).strategy
    assert s.cycles[HEAD] > 0 and s.cycles["lookup"] + s.cycles["mixed"] > 0


@pytest.mark.parametrize("opts, match", [
    ({"draft_len": 0}, r"draft_len \(head drafts per cycle\) must be an integer in 1\.\.64, got 0"),
    ({"draft_len": 65}, r"in 1\.\.64, got 65"),
    ({"lookup_len": 0}, r"lookup_len \(copied drafts per cycle\) must be an integer in 1\.\.64"),
    ({"exit_layer": 9}, r"exit layer 9 must be an integer in 1\.\.5"),
    ({"exit_layer": 0}, r"exit layer 0 must be an integer in 1\.\.5"),
    ({"exit_layer": "2,4"}, "hybrid drafts from one exit"),
    ({"draft_cost": 0}, r"draft_cost .* must be a number in \(0, 2\]"),
    ({"draft_cost": 3.0}, r"in \(0, 2\], got 3.0"),
    ({"draft_cost": "cheap"}, "draft_cost must be a number"),
    ({"min_ngram": 4, "max_ngram": 2}, "min_ngram"),
    ({"datastore": "yes"}, "datastore must be true or false"),
    ({"datastore": True}, "draft corpus"),
    ({"gamma": 3}, "no option"),
])
def test_impossible_settings_are_refused_with_the_limit_named(opts, match):
    with pytest.raises(StrategyOptionError, match=match):
        greedy(tiny_loaded("llama"), "a", strategy="hybrid", **opts)


def test_drafts_deeper_than_the_context_are_refused_with_the_limit_named():
    from exitspec.decoding.config import GenerationError

    m = tiny_loaded("llama")  # 512 positions: 1 + 505 + 1 fit, 8 head drafts (9 positions) beyond them do not
    with pytest.raises(GenerationError, match=r"\+ hybrid's 9 draft positions exceeds the model's context of 512 "
                                              "positions; .* or the draft length"):
        greedy(m, "a", n=505, strategy="hybrid", exit_layer=2, draft_len=8)


def test_exits_come_from_the_bundle_and_its_self_spec_recommendation():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    with pytest.raises(BundleError, match="exits at layers"):
        hybrid(m, exit_layer=3)
    m.heads.config.recommended["self-spec"] = {"exit_layer": 4, "draft_len": 2}
    d = hybrid(m).describe()
    assert (d["strategy"], d["exit_layer"], d["draft_len"], d["lookup_len"]) == ("hybrid", 4, 2, 3)
    assert hybrid(m, exit_layer=2).describe()["draft_len"] == 4  # naming a layer drops the recommended set


# --- the real default model --------------------------------------------------------------------------
@pytest.mark.slow
def test_hybrid_greedy_equals_vanilla_on_the_default_model_with_its_shipped_heads(default_model):
    from exitspec.decoding.api import encode_prompt
    from exitspec.loading import attach_heads
    from exitspec.prompts import mixed_prompts

    m = default_model
    saved = m.heads
    try:
        try:
            attach_heads(m, "default")
        except BundleError:
            pytest.skip("no shipped head bundle in this build")
        chat = [encode_prompt(m.tokenizer, p.text) for p in mixed_prompts("heldout", 1, max_chars=300)[:3]]
        kw = dict(prompt_ids=chat, max_new_tokens=24, ignore_eos=True)
        ref = exitspec.generate(m, None, **kw).token_ids
        s = make_strategy("hybrid", m)  # the shipped bundle's self-spec exit, drafts and draft vocabulary
        assert s.describe()["exit_layer"] in m.heads.layers and s.describe()["datastore_tokens"] > 0
        assert exitspec.generate(m, None, strategy=s, **kw).token_ids == ref  # a ragged batch of 3
        cheap = make_strategy("hybrid", m, draft_cost=0.05)  # the head drafts wherever no copy is proposed
        for i, ids_ in enumerate(chat):
            out = exitspec.generate(m, None, strategy=cheap, **(kw | {"prompt_ids": [ids_]}))
            assert out.token_ids[0] == ref[i], i
        assert cheap.usage[HEAD]["accepted"] > 0 and cheap.usage["lookup"]["accepted"] > 0
    finally:
        m.heads = saved
