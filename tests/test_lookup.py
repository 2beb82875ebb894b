"""Prompt lookup on the layered runtime is lossless: greedy equals vanilla, sampling follows p."""

from __future__ import annotations

import json

import pytest
import torch

import exitspec
from conftest import VOCAB, tiny_loaded
from exitspec.decoding.api import make_strategy
from exitspec.decoding.datastore import NgramStore
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.sampling import SamplingParams, probs
from exitspec.decoding.strategies.lookup import Lookup, NgramIndex
from exitspec.heads.bundle import BundleError, HeadBundle
from helpers_strategies import PROMPTS, greedy


def test_ngram_index_prefers_the_longest_then_the_latest_match():
    ix = NgramIndex(1, 3)
    seq = [1, 2, 3, 9, 1, 2, 4, 7, 2, 3]
    assert ix.propose(seq, 3) == ([9, 1, 2], 2)  # (2, 3) occurred once, followed by 9 1 2
    seq += [5, 1, 2]
    assert ix.propose(seq, 2) == ([4, 7], 2)  # (1, 2) last occurred before 4 7 (the suffix itself does not count)
    assert ix.propose(seq + [8], 2) == ([], 0)  # 8 never occurred before
    assert NgramIndex(2, 3).propose([5, 1, 5], 3) == ([], 0)  # a 1-gram match is below min_ngram


def test_a_match_near_the_end_repeats_with_its_period():
    """LZ77-style: a copy that reaches the end of the sequence continues with the text it copied."""
    assert NgramIndex(1, 3).propose([6, 6], 4) == ([6, 6, 6, 6], 1)  # period 1
    assert NgramIndex(1, 3).propose([3, 1, 4, 1, 4], 5) == ([1, 4, 1, 4, 1], 2)  # (1, 4) 2 back: period 2
    assert NgramIndex(1, 3).propose([7, 8, 9, 7, 8, 9, 7, 8], 4) == ([9, 7, 8, 9], 3)


def test_acceptance_tracker_drafts_as_far_as_drafts_get_accepted():
    from exitspec.decoding.strategies.lookup import AcceptanceTracker

    t = AcceptanceTracker(6)
    free = [1.0] * 7  # rows cost nothing: draft everything proposed
    flat = [1.0 + 0.15 * k for k in range(7)]  # each row costs 0.15 of a 1-row step
    cliff = [1.0, 1.02, 1.04, 1.06, 1.5, 1.6, 1.7]  # cheap up to 4 rows, dear beyond
    assert t.length("new", 6, free, 1.0) == 6
    # neutral prior 0.5 per depth: survival 0.5, 0.25, 0.125, ...; a draft pays while it beats 0.15
    assert t.length("new", 6, flat, 1.0) == 2
    for _ in range(50):
        t.update("strong", 6, 6)  # every draft accepted
        t.update("weak", 6, 0)  # the first draft always rejected
    assert t.length("strong", 6, flat, 1.3) == 6 and t.length("strong", 4, flat, 1.3) == 4
    assert t.length("weak", 6, flat, 1.3) == 1  # never below one: the source keeps being tried
    assert t.length("new", 6, cliff, 1.3) == 3  # 3 nearly free drafts, not a 4th at the cliff
    s = t.survival("weak")
    assert s[0] < 0.05 and s[1] <= s[0]


@pytest.mark.parametrize("draft_len, max_ngram", [(1, 1), (3, 3), (6, 2)])
def test_greedy_equals_vanilla_batch_and_single(family, draft_len, max_ngram):
    m = tiny_loaded(family)
    ref = greedy(m, PROMPTS, n=30)
    out = greedy(m, PROMPTS, n=30, strategy="lookup", draft_len=draft_len, max_ngram=max_ngram)
    assert out.token_ids == ref.token_ids  # batch of 4 ragged prompts, rows with and without matches
    one = greedy(m, PROMPTS[1], n=30, strategy="lookup", draft_len=draft_len, max_ngram=max_ngram)
    assert one.token_ids[0] == ref.token_ids[1]
    s = out.stats
    # A batch's drafts are cut by the runtime's measured position costs (Lookup.fit_batch), which a
    # loaded machine can make look dear: only a single row's count is independent of timing.
    assert 0 <= s.accepted <= s.drafted <= s.steps * draft_len
    assert s.new_tokens == sum(len(t) for t in out.token_ids)
    assert 0 < one.stats.accepted <= one.stats.drafted  # tiny random models loop: copies get accepted


def _p_next(m, ids, params):
    with torch.inference_mode():
        cache = m.lm.new_cache(1, len(ids) + 1)
        return probs(m.lm.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0, -1], params)


def test_sampled_tokens_follow_the_model_distribution():
    """3000 copies of a repetitive prompt: the first two sampled tokens ~ the model's own p,
    although lookup proposes a copied token at both positions."""
    m = tiny_loaded("llama")
    params = SamplingParams(temperature=1.5, top_k=8)
    # A prompt "5 6 t 5 6" whose copied draft t is neither sure nor impossible, so accept and reject both run.
    t = next(t for t in range(VOCAB) if 0.1 < _p_next(m, [5, 6, t, 5, 6], params)[t] < 0.9)
    ids = [5, 6, t, 5, 6]  # lookup proposes t 5 after the pending 6
    N = 3000
    out = exitspec.generate(m, None, prompt_ids=[ids] * N, chat=False, max_new_tokens=2, ignore_eos=True,
                            temperature=1.5, top_k=8, seed=3, strategy="lookup", draft_len=2)
    toks = torch.tensor(out.token_ids)  # (N, 2)
    p1 = _p_next(m, ids, params)
    emp = torch.bincount(toks[:, 0], minlength=VOCAB).float() / N
    assert torch.all((emp - p1).abs() <= 5 * (p1 * (1 - p1) / N).sqrt() + 2e-3)
    # The second token, given that the first was the copied t, follows p(. | ids + [t]).
    p2 = _p_next(m, ids + [t], params)
    sel = toks[toks[:, 0] == t, 1]
    emp2 = torch.bincount(sel, minlength=VOCAB).float() / len(sel)
    assert torch.all((emp2 - p2).abs() <= 5 * (p2 * (1 - p2) / len(sel)).sqrt() + 2e-3)
    assert 0 < out.stats.accepted < out.stats.drafted


@pytest.mark.parametrize("opts, match", [
    ({"draft_len": 0}, "draft_len must be"),
    ({"min_ngram": 4, "max_ngram": 2}, "min_ngram"),
    ({"exit_layer": 3}, "no option"),
    ({"datastore": "yes"}, "datastore must be true or false"),
    ({"datastore": 1}, "datastore must be true or false"),
])
def test_bad_options_get_clear_errors(opts, match):
    with pytest.raises(StrategyOptionError, match=match):
        greedy(tiny_loaded("llama"), "a", strategy="lookup", **opts)


# --- the draft datastore -----------------------------------------------------------------------------
def test_datastore_proposes_the_most_frequent_continuation_of_the_longest_match():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 7, 8], [9, 2, 3, 7, 8], [6, 6, 1, 2]]
    st = NgramStore.from_sequences(seqs, vocab_size=10, min_n=2, max_n=3)
    assert st.tokens == 19
    assert st.propose([0, 2, 3], 3) == ([7, 8], 2)  # (2, 3) -> 7 8 twice, 4 5 once; clipped at the sequence end
    assert st.propose([5, 1, 2, 3], 2)[0] == [4, 5]  # (1, 2, 3) -> 4 5 and 7 8 once each: the earliest wins
    assert NgramStore.from_sequences(seqs[1:], 10, 2, 3).propose([1, 2, 3], 2)[0] == [7, 8]
    assert st.propose([6, 1], 3)[0] == [2]  # the copy stops where its sequence ends
    assert st.propose([4, 5, 1], 2)[0] == []  # (5, 1) spans two sequences: never indexed
    assert st.propose([1, 2], 2)[0] == [3, 4] and st.propose([2], 2)[0] == []  # a 1-gram is below min_n
    assert NgramStore.from_sequences([], 10).propose([1, 2, 3], 2)[0] == []
    # Too short for a 4-gram with a continuation:
    short = NgramStore.from_sequences([[1, 2, 3], [4]], 10, min_n=2, max_n=4)
    assert short.propose([0, 1, 2], 2)[0] == [3] and short.propose([0, 1, 2, 3], 2)[0] == []


def test_datastore_hash_is_exact_and_wraps_safely_for_large_vocabularies():
    rng = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 150_000, (60,), generator=rng).tolist() for _ in range(20)]
    st = NgramStore.from_sequences(seqs, vocab_size=150_000, min_n=2, max_n=4)  # 150001^4 > 2^63: a wrapped hash
    for s in seqs:
        for j in (10, 30, 55):
            assert st.propose(s[:j], 3)[0] == s[j:j + 3]  # random 4-grams are unique: their own continuation


def test_draft_corpus_is_stored_in_16_bits_when_the_vocabulary_fits():
    from exitspec.heads.bundle import _pack_corpus, _unpack_corpus

    flat = torch.tensor([0, 1, 32767, 32768, 49151, -1, 7, -1], dtype=torch.int32)
    packed = _pack_corpus(flat, vocab=49152)
    assert packed.dtype == torch.int16 and torch.equal(_unpack_corpus(packed), flat)
    wide = _pack_corpus(torch.tensor([70000, -1], dtype=torch.int32), vocab=150_000)
    assert wide.dtype == torch.int32 and _unpack_corpus(wide).tolist() == [70000, -1]
    assert _unpack_corpus(flat).tolist() == flat.tolist()  # bundles saved before packing still load


def test_bundle_keeps_the_draft_corpus(tmp_path):
    m = tiny_loaded("llama")
    b = HeadBundle.create(m.lm, [2], "norm_lm")
    assert b.draft_sequences() is None
    b.set_draft_corpus([[5, 6, 7], [], [8]], source="test")
    b.save(tmp_path / "b", dtype=torch.float16)
    back = HeadBundle.load(tmp_path / "b", m.lm)
    assert back.draft_sequences() == [[5, 6, 7], [], [8]] and back.config.draft_corpus["source"] == "test"
    with pytest.raises(BundleError, match="token ids must be in"):
        b.set_draft_corpus([[VOCAB]], source="bad")
    # A corpus damaged on disk is refused when lookup builds its store, not fed to the embedding.
    back.draft_corpus[1] = VOCAB + 5
    m.heads = back
    with pytest.raises(BundleError, match="draft corpus is damaged"):
        greedy(m, "a", strategy="lookup")
    back.set_draft_corpus([[5, 6, 7, 5, 6, 7]], source="fixed")  # a new corpus: the store is rebuilt
    assert make_strategy("lookup", m).describe()["datastore_tokens"] == 6
    # bundle.json describing a corpus that heads.safetensors lacks: a clear error, not a crash.
    cfg = json.loads((tmp_path / "b" / "bundle.json").read_text())
    HeadBundle.create(m.lm, [2], "norm_lm").save(tmp_path / "c")
    (tmp_path / "c" / "bundle.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="lacks the draft corpus"):
        HeadBundle.load(tmp_path / "c", m.lm)
    # A format-1 bundle (before draft corpora) still loads.
    cfg1 = {k: v for k, v in json.loads((tmp_path / "c" / "bundle.json").read_text()).items() if k != "draft_corpus"}
    HeadBundle.create(m.lm, [2], "norm_lm").save(tmp_path / "d")
    (tmp_path / "d" / "bundle.json").write_text(json.dumps(cfg1 | {"format_version": 1}))
    assert HeadBundle.load(tmp_path / "d", m.lm).draft_sequences() is None


def test_lookup_with_a_datastore_is_lossless_and_uses_it():
    m = tiny_loaded("qwen2")
    ref = greedy(m, PROMPTS, n=30)
    # The model's own answers to other prompts: what a self-distilled corpus holds.
    m.heads = HeadBundle.create(m.lm, [2], "norm_lm")
    corpus = greedy(m, ["some other prompt", "another one", "hi there", "x y"], n=40).token_ids
    m.heads.set_draft_corpus(corpus, source="test")
    out = greedy(m, PROMPTS, n=30, strategy="lookup", min_ngram=2)
    assert out.token_ids == ref.token_ids
    without = greedy(m, PROMPTS, n=30, strategy="lookup", min_ngram=2, datastore=False)
    assert without.token_ids == ref.token_ids
    assert out.stats.drafted > without.stats.drafted  # the store proposed where the context had no 2-gram
    assert make_strategy("lookup", m).describe()["datastore_tokens"] == sum(len(c) for c in corpus)
    m.heads = None
    with pytest.raises(StrategyOptionError, match="draft corpus"):
        greedy(m, "a", strategy="lookup", datastore=True)


def test_datastore_command_replaces_the_corpus_and_keeps_the_heads(tmp_path):
    """`exitspec datastore`: the model's greedy answers to a prompt file's train split become the
    bundle's draft corpus; head weights and settings are copied unchanged."""
    from conftest import save_tiny_model
    from exitspec.cli import main
    from exitspec.loading import load

    folder = save_tiny_model(tmp_path / "m", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    m = load(str(folder))
    bundle = HeadBundle.create(m.lm, [2, 4], "swiglu", width=8)
    with torch.no_grad():
        bundle.head(2).down.weight.normal_()
    bundle.set_draft_corpus([[1, 2, 3]], source="old")
    bundle.save(tmp_path / "b")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"question number {i}?"}) for i in range(10)) + "\n")
    rc = main(["datastore", "--model", str(folder), "--heads", str(tmp_path / "b"), "--data", str(prompts),
               "--out", str(tmp_path / "new"), "--max-new-tokens", "6", "--batch", "4", "--work", str(tmp_path / "w"),
               "--no-progress"])
    assert rc == 0
    new = HeadBundle.load(tmp_path / "new", m.lm)
    seqs = new.draft_sequences()
    assert len(seqs) == 8  # the train split: 8 of 10 prompts
    assert all(len(s) == 6 + 3 for s in seqs)  # each answer with the last 3 prompt tokens
    assert "8 train prompts" in new.config.draft_corpus["source"]
    assert torch.equal(new.head(2).down.weight, bundle.head(2).down.weight)
    assert new.config.exit_layers == [2, 4]
    # Without --heads the command says what it needs.
    assert main(["datastore", "--model", str(folder), "--out", str(tmp_path / "x")]) == 2


def test_a_batch_cuts_greedy_drafts_where_its_positions_cost_more_than_they_bring():
    """fit_batch: where every position costs as much as a row (compute-bound), 8 greedy rows verify
    no drafts; where positions are free (memory-bound) they keep all; sampled rows keep theirs, and
    the greedy rows are cut no shorter than them (padding would cost the positions anyway)."""
    lookup = Lookup(draft_len=3)
    props, sources = [[5, 6, 7]] * 8, ["context"] * 8
    linear = {n: float(n) for n in (1, 2, 4, 8, 16, 32)}
    flat = {n: 1.0 for n in (1, 2, 4, 8, 16, 32)}
    assert lookup.fit_batch(linear, props, sources, [True] * 8) == [[]] * 8
    assert lookup.fit_batch(flat, props, sources, [True] * 8) == props
    mixed = [[5, 6, 7]] * 7 + [[9]]
    cut = lookup.fit_batch(linear, mixed, sources, [True] * 7 + [False])
    assert cut == [[5]] * 7 + [[9]]
