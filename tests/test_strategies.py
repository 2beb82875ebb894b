"""dssd (lossless), cascade and mlp-skip (lossy): exactness at the extremes, consistency of the cache."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_loaded
from exitspec.decoding.exits import StrategyOptionError
from helpers_strategies import PROMPTS, greedy, reference_hidden, tokens_and_exits, with_heads

# --- dssd ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, threshold", [([1, 3, 5], 0.5), ([2, 4], 0.0)])
def test_dssd_greedy_equals_vanilla(family, layers, threshold):
    m = with_heads(family, thresholds={k: threshold for k in layers})
    ref = greedy(m, PROMPTS)
    out = greedy(m, PROMPTS, strategy="dssd", exit_layers=layers, max_draft=5)
    assert out.token_ids == ref.token_ids
    one = greedy(m, PROMPTS[2], strategy="dssd", exit_layers=layers, max_draft=5)
    assert one.token_ids[0] == ref.token_ids[2]
    if threshold == 0.0:  # every exit confident: drafting runs to the (adaptive) budget
        assert out.stats.drafted >= out.stats.steps


def test_dssd_drafts_from_several_exits_and_adapts():
    m = with_heads("gpt2", thresholds={1: 0.6, 3: 0.5, 5: 0.3})
    ref = greedy(m, PROMPTS, n=30)
    out = greedy(m, PROMPTS, n=30, strategy="dssd", exit_layers=[1, 3, 5], draft_len=2, max_draft=6)
    assert out.token_ids == ref.token_ids
    hist = out.stats.exit_histogram
    assert sum(v for k, v in hist.items() if k < 6) > 0 and len(hist) >= 3, hist  # drafts from >1 exit
    assert max(n for r in out.stats.rows for n in r.accept_lengths) > 2  # the budget grew past draft_len


def test_dssd_never_confident_is_vanilla_with_no_drafts():
    m = with_heads("llama", thresholds={2: 1.1})
    out = greedy(m, PROMPTS, strategy="dssd", exit_layers=[2])
    assert out.token_ids == greedy(m, PROMPTS).token_ids and out.stats.drafted == 0


def test_dssd_needs_a_threshold():
    m = tiny_loaded("llama")
    with pytest.raises(StrategyOptionError, match="calibrated confidence threshold"):
        greedy(m, "a", strategy="dssd", exit_layers=[2])
    greedy(m, "a", n=4, strategy="dssd", exit_layers=[2], threshold=0.5)  # an explicit one works


# --- cascade ------------------------------------------------------------------------------------


@pytest.mark.parametrize("propagate", [False, True])
def test_cascade_extremes(family, propagate):
    layers = [2, 4]
    m = with_heads(family, thresholds={2: 1.1, 4: 1.1})
    out = greedy(m, PROMPTS, strategy="cascade", exit_layers=layers, state_propagation=propagate)
    assert out.token_ids == greedy(m, PROMPTS).token_ids  # never confident: the full model
    m.heads.config.thresholds["2"]["value"] = 0.0  # always confident at the first exit
    toks, exits = tokens_and_exits(m, PROMPTS[:2], strategy="cascade", exit_layers=layers,
                                   state_propagation=propagate)
    head = m.heads.head(2)
    for row, prompt in enumerate(PROMPTS[:2]):
        assert set(exits[row]) <= {2, m.lm.num_layers}
        ids = m.tokenizer(prompt)["input_ids"] + toks[row]
        hs = reference_hidden(m.lm, ids[:-1])  # layers < 2 are exact in both modes
        want = head(hs[2][None])[0].argmax(-1)[len(ids) - 1 - len(toks[row]):]
        got = torch.tensor(toks[row])
        forced = torch.tensor(exits[row]) == m.lm.num_layers  # max_deferred forces a full token
        assert torch.equal(got[~forced], want[~forced])


@pytest.mark.parametrize("family_", ["llama", "gpt_neox"])
def test_cascade_deferred_recomputation_keeps_later_tokens_exact(family_):
    """Mixed exits; every token, exited or not, must equal what the exact model computes at its
    exit given the generated prefix: the deferred KV entries are the full model's."""
    m = with_heads(family_, thresholds={2: 0.45, 4: 0.45})
    toks, exits = tokens_and_exits(m, PROMPTS[:3], n=30, strategy="cascade", exit_layers=[2, 4], max_deferred=4)
    L = m.lm.num_layers
    mixed = set()
    for row, prompt in enumerate(PROMPTS[:3]):
        ids = m.tokenizer(prompt)["input_ids"] + toks[row]
        hs = reference_hidden(m.lm, ids[:-1])
        start = len(ids) - 1 - len(toks[row])
        for i, (t, e) in enumerate(zip(toks[row], exits[row], strict=True)):
            h = hs[e][start + i]
            logits = m.lm.logits(h) if e == L else m.heads.head(e)(h[None, None])[0, 0]
            assert int(logits.argmax()) == t, (row, i, e)
        mixed |= set(exits[row])
    assert {2, L} <= mixed or {4, L} <= mixed, mixed  # both exited and full tokens occurred


def test_cascade_precheck_only_sends_tokens_deeper():
    """The pre-check over a frequent-token subset removes candidates and adds none: up to the first
    token whose exit differs, both runs agree token for token, and there the pre-checked run goes
    deeper. A subset of every token changes nothing."""
    m = with_heads("llama", thresholds={2: 0.3, 4: 0.3})
    vocab = m.lm.vocab_size
    kw = dict(n=30, strategy="cascade", exit_layers=[2, 4])
    ref_t, ref_e = tokens_and_exits(m, PROMPTS[:3], precheck_vocab=0, **kw)
    assert tokens_and_exits(m, PROMPTS[:3], precheck_vocab=list(range(vocab)), **kw) == (ref_t, ref_e)
    pre_t, pre_e = tokens_and_exits(m, PROMPTS[:3], precheck_vocab=list(range(0, vocab, 3)), **kw)
    differed = 0
    for row in range(3):
        diff = next((i for i, (a, b) in enumerate(zip(ref_e[row], pre_e[row], strict=True)) if a != b), None)
        if diff is None:
            assert pre_t[row] == ref_t[row]
            continue
        differed += 1
        assert pre_t[row][:diff] == ref_t[row][:diff] and pre_e[row][diff] > ref_e[row][diff]
    assert differed and any(e < m.lm.num_layers for row in ref_e for e in row)
    with pytest.raises(StrategyOptionError, match="precheck_vocab"):
        greedy(m, "a", strategy="cascade", exit_layers=[2], precheck_vocab=-1)


def test_cascade_state_propagation_matches_calm_reference():
    """Exited positions feed their exit hidden state to every layer above (batch 1)."""
    m = with_heads("llama", thresholds={3: 0.45})
    toks, exits = tokens_and_exits(m, PROMPTS[1], n=30, strategy="cascade", exit_layers=[3], state_propagation=True)
    L = m.lm.num_layers
    toks, exits = toks[0], exits[0]
    assert {3, L} <= set(exits)
    ids = m.tokenizer(PROMPTS[1])["input_ids"] + toks
    start = len(ids) - 1 - len(toks)
    frozen = {start + i: 3 for i, e in enumerate(exits) if e == 3}
    hs = reference_hidden(m.lm, ids[:-1], frozen=frozen)
    exact = reference_hidden(m.lm, ids[:-1])
    for i, (t, e) in enumerate(zip(toks, exits, strict=True)):
        if e == L:
            assert int(m.lm.logits(hs[L][start + i]).argmax()) == t, i
    # The propagated context really differs from the exact one (the check distinguishes the modes).
    assert not torch.allclose(hs[L], exact[L], atol=1e-4)


def test_cascade_needs_a_threshold():
    with pytest.raises(StrategyOptionError, match="calibrated confidence threshold"):
        greedy(tiny_loaded("llama"), "a", strategy="cascade", exit_layers=[2])


# --- mlp-skip -----------------------------------------------------------------------------------


def test_mlp_skip_extremes(family):
    m = with_heads(family, thresholds={2: 1.1})
    ref = greedy(m, PROMPTS)
    assert greedy(m, PROMPTS, strategy="mlp-skip", exit_layer=2, start_layer=3).token_ids == ref.token_ids
    cos = greedy(m, PROMPTS, strategy="mlp-skip", probe="cosine", start_layer=2, threshold=1.0)
    assert cos.token_ids == ref.token_ids
    # Always settled: every token runs layers 3.. without MLP; compare with a from-scratch pass.
    m.heads.config.thresholds["2"]["value"] = 0.0
    out = greedy(m, PROMPTS[:2], n=12, strategy="mlp-skip", exit_layer=2, start_layer=3)
    skip = set(range(3, m.lm.num_layers))
    for row, prompt in enumerate(PROMPTS[:2]):
        ids = m.tokenizer(prompt)["input_ids"] + out.token_ids[row]
        n_prompt = len(ids) - len(out.token_ids[row])
        # The prompt is prefilled by the full model; from the last prompt token on, MLPs are skipped.
        h = reference_hidden(m.lm, ids[:-1], skip_mlp=skip, skip_from=n_prompt - 1)[-1]
        want = m.lm.logits(h).argmax(-1)[-len(out.token_ids[row]):].tolist()
        assert out.token_ids[row] == want
    assert out.stats.layers_per_token < m.lm.num_layers


def test_mlp_skip_precheck_only_skips_fewer_mlps():
    """The head probe's frequent-token pre-check: a subset holding every token changes nothing; with
    the gate always passing it passes too; with a mid threshold, the pre-checked run computes at least
    as many layers per token on each prompt here, and more on one."""
    m = with_heads("llama", thresholds={2: 0.3})
    vocab = m.lm.vocab_size
    kw = dict(n=30, strategy="mlp-skip", exit_layer=2, start_layer=3)
    prompts = PROMPTS[1:3]  # one at a time: in a batch a layer's MLP is skipped only if every row settled
    ref = [greedy(m, [p], precheck_vocab=0, **kw) for p in prompts]
    for p, r in zip(prompts, ref, strict=True):
        same = greedy(m, [p], precheck_vocab=list(range(vocab)), **kw)
        assert same.token_ids == r.token_ids and same.stats.layers_per_token == r.stats.layers_per_token
    sub = [greedy(m, [p], precheck_vocab=list(range(0, vocab, 3)), **kw) for p in prompts]
    assert all(r.stats.layers_per_token <= s.stats.layers_per_token for r, s in zip(ref, sub, strict=True))
    assert any(r.stats.layers_per_token < s.stats.layers_per_token for r, s in zip(ref, sub, strict=True))
    assert all(r.stats.layers_per_token < m.lm.num_layers for r in ref)  # the probe did settle tokens
    m.heads.config.thresholds["2"]["value"] = 0.0
    every = greedy(m, PROMPTS, precheck_vocab=0, **kw)
    assert greedy(m, PROMPTS, precheck_vocab=list(range(0, vocab, 3)), **kw).token_ids == every.token_ids
    with pytest.raises(StrategyOptionError, match="precheck_vocab"):
        greedy(m, "a", strategy="mlp-skip", exit_layer=2, precheck_vocab="many")


def test_mlp_skip_cosine_probe_skips_when_settled():
    m = tiny_loaded("llama")
    out = greedy(m, PROMPTS, strategy="mlp-skip", probe="cosine", start_layer=2, threshold=0.0)
    assert out.stats.layers_per_token < m.lm.num_layers  # settled after layer 2: MLPs of 3.. skipped
