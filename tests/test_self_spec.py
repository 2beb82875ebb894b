"""Self-speculative decoding is lossless: greedy equals vanilla, sampling follows the model's distribution."""

from __future__ import annotations

import pytest
import torch

import exitspec
from conftest import VOCAB, tiny_loaded
from exitspec.decoding.draft_vocab import DraftHead
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.sampling import SamplingParams, probs
from exitspec.decoding.speculative import rejection_step, verify
from exitspec.heads.bundle import BundleError, HeadBundle
from helpers_strategies import PROMPTS, greedy


@pytest.mark.parametrize("exit_layer, draft_len", [(1, 1), (3, 3), (5, 6)])
def test_greedy_equals_vanilla_batch_and_single(family, exit_layer, draft_len):
    m = tiny_loaded(family)
    ref = greedy(m, PROMPTS)
    out = greedy(m, PROMPTS, strategy="self-spec", exit_layer=exit_layer, draft_len=draft_len)
    assert out.token_ids == ref.token_ids  # batch of 4 ragged prompts
    one = greedy(m, PROMPTS[1], strategy="self-spec", exit_layer=exit_layer, draft_len=draft_len)
    assert one.token_ids[0] == ref.token_ids[1]  # batch 1
    s = out.stats
    assert s.drafted == s.steps * draft_len and 0 <= s.accepted <= s.drafted
    assert s.new_tokens == sum(len(t) for t in out.token_ids)


def test_drafts_are_accepted_and_exit_layers_reported():
    # gpt2's tiny random model agrees with its own layer-5 reading often: drafts must be kept.
    m = tiny_loaded("gpt2")
    out = greedy(m, PROMPTS, n=30, strategy="self-spec", exit_layer=5, draft_len=3)
    assert out.stats.accepted > 0 and out.stats.tokens_per_step > 1
    assert set(out.stats.exit_histogram) == {5, 6}
    assert out.stats.exit_histogram[5] <= out.stats.accepted  # the driver may cut the last step short


def test_reduced_draft_vocabulary_stays_lossless():
    m = tiny_loaded("llama")
    ref = greedy(m, PROMPTS)
    out = greedy(m, PROMPTS, strategy="self-spec", exit_layer=4, draft_len=3, draft_vocab=list(range(0, VOCAB, 2)))
    assert out.token_ids == ref.token_ids
    assert out.stats.drafted > 0


def test_draft_head_subset_logits_match_full_head():
    m = tiny_loaded("qwen2")
    head = HeadBundle.create(m.lm, [3]).head(3)
    vocab = torch.tensor([0, 5, 17, 60, 95])
    h = torch.randn(2, 64)
    sub = DraftHead(head, vocab).logits(h)
    torch.testing.assert_close(sub, head(h)[:, vocab])
    gen = torch.Generator().manual_seed(0)
    tok, q = DraftHead(head, vocab).choose(sub, SamplingParams(temperature=1.0), gen, VOCAB)
    assert set(tok.tolist()) <= set(vocab.tolist())
    assert torch.all(q.sum(-1).sub(1).abs() < 1e-5) and q[:, [1, 2, 3]].sum() == 0


def _tv(samples: torch.Tensor, p: torch.Tensor) -> float:
    emp = torch.bincount(samples, minlength=p.numel()).float() / samples.numel()
    return 0.5 * (emp - p).abs().sum().item()


@pytest.mark.parametrize("subset", [False, True])
def test_rejection_sampling_reproduces_the_target_distribution(subset):
    """Many independent trials as rows of one call: the first emitted token must follow p exactly,
    whatever q is (a q that is zero outside a subset included)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.2])
    q = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.0]) if subset else torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])
    N, K = 200_000, 2
    drafts = torch.multinomial(q, N * K, replacement=True, generator=g).view(N, K)
    pp = p.expand(N, K + 1, 5)
    qq = q.expand(N, K, 5)
    v = rejection_step(pp, qq, drafts, g, torch.full((N,), K))
    first = torch.where(v.accepted > 0, drafts[:, 0], v.next_token)
    assert _tv(first, p) < 0.006  # sampling noise at N=200k is ~0.002
    assert _tv(drafts[:, 0], p) > 0.2  # while the drafts alone are far from p
    # The second token given an accepted first one follows p too (independent positions here).
    second = torch.where(v.accepted > 1, drafts[:, 1], v.next_token)[v.accepted >= 1]
    assert _tv(second, p) < 0.01


def test_greedy_verification_is_argmax_agreement():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])  # argmax 1, 0, 2
    v = verify(logits, torch.tensor([[1, 2]]), None, SamplingParams(), None)
    assert v.accepted.tolist() == [1] and v.next_token.tolist() == [0]  # correction at position 1
    v = verify(logits, torch.tensor([[1, 0]]), None, SamplingParams(), None)
    assert v.accepted.tolist() == [2] and v.next_token.tolist() == [2]  # bonus token
    v = verify(logits, torch.tensor([[1, 0]]), None, SamplingParams(), None, limit=torch.tensor([1]))
    assert v.accepted.tolist() == [1] and v.next_token.tolist() == [0]  # only one draft proposed


def test_first_token_distribution_matches_vanilla_end_to_end():
    """The same prompt as 3000 rows of one batch: self-spec's first token ~ the model's own p."""
    m = tiny_loaded("llama")
    params = SamplingParams(temperature=1.3, top_k=40)
    ids = m.tokenizer("the cat")["input_ids"]
    N = 3000
    kw = dict(prompt_ids=[ids] * N, chat=False, max_new_tokens=2, ignore_eos=True, temperature=1.3, top_k=40)
    out = exitspec.generate(m, None, strategy="self-spec", exit_layer=1, draft_len=2, seed=1, **kw)
    first = torch.tensor([t[0] for t in out.token_ids])
    with torch.inference_mode():
        cache = m.lm.new_cache(1, len(ids) + 1)
        logits = m.lm.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0, -1]
    p = probs(logits, params)
    emp = torch.bincount(first, minlength=VOCAB).float() / N
    sigma = (p * (1 - p) / N).sqrt()
    assert torch.all((emp - p).abs() <= 5 * sigma + 2e-3)
    assert out.stats.drafted > 0 and 0 < out.stats.accepted < out.stats.drafted
    # The exit-1 draft distribution alone is clearly different: the check has teeth.
    head = HeadBundle.create(m.lm, [1]).head(1)
    with torch.inference_mode():
        cache = m.lm.new_cache(1, len(ids) + 1)
        pos = torch.arange(len(ids))[None]
        h = m.lm.run_layers(m.lm.embed(torch.tensor([ids]), pos), pos, cache, 0, 1)
    q = probs(head(h)[0, -1], params)
    assert 0.5 * (q - p).abs().sum() > 0.2


def test_bad_options_get_clear_errors():
    m = tiny_loaded("llama")
    with pytest.raises(StrategyOptionError, match="exit layer 9 must be"):
        greedy(m, "a", strategy="self-spec", exit_layer=9)
    with pytest.raises(StrategyOptionError, match="draft_len must be"):
        greedy(m, "a", strategy="self-spec", exit_layer=2, draft_len=0)
    with pytest.raises(StrategyOptionError, match="no option"):
        greedy(m, "a", strategy="self-spec", exit_layer=2, gamma=3)
    m.heads = HeadBundle.create(m.lm, [2])
    with pytest.raises(BundleError, match="exits at layers"):
        greedy(m, "a", strategy="self-spec", exit_layer=3)


def test_bundle_recommended_settings_fill_in_only_without_an_exit_layer():
    from exitspec.decoding.api import make_strategy

    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2, 4])
    m.heads.config.recommended["self-spec"] = {"exit_layer": 2, "draft_len": 2}
    assert make_strategy("self-spec", m).describe()["draft_len"] == 2
    assert make_strategy("self-spec", m, draft_len=5).describe() == {
        "strategy": "self-spec", "exit_layer": 2, "draft_len": 5, "draft_vocab": None}
    # Naming a layer drops the whole recommended set: its draft length belongs to its layer.
    assert make_strategy("self-spec", m, exit_layer=4).describe()["draft_len"] == 4


def test_cycle_costs_and_the_speedups_they_imply():
    from exitspec.decoding.spec_costs import (
        break_even_accepted,
        candidate_exits,
        exit_costs,
        expected_speedup,
        iid_accepted,
    )

    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2, 4])
    m.heads.config.training["heldout_eval"] = {"trained": {"2": {"agreement": 0.5}}}
    rows = exit_costs(m, gamma=3, repeats=2, context=16)
    assert [r["exit_layer"] for r in rows] == [2, 4]
    for r in rows:
        assert min(r["vanilla_step_ms"], r["draft_layers_ms"], r["verify_ms"]) > 0
        assert r["cycle_ms"] == pytest.approx(4 * r["draft_layers_ms"] + 3 * (r["draft_step_ms"] - r["draft_layers_ms"])
                                              + r["verify_ms"])
        assert r["ceiling_speedup"] == pytest.approx(expected_speedup(r, 3))
        assert expected_speedup(r, break_even_accepted(r)) == pytest.approx(1.0)
        p = r["break_even_agreement"]  # the per-draft agreement whose iid E[accepted] is the break-even one
        assert (p is None and break_even_accepted(r) > 3) or iid_accepted(p, 3) == pytest.approx(
            max(0.0, break_even_accepted(r)), abs=1e-9)
    assert rows[0]["heldout_agreement"] == 0.5 and rows[1]["heldout_agreement"] is None
    assert rows[0]["predicted_speedup"] == pytest.approx(expected_speedup(rows[0], 0.5 + 0.25 + 0.125))
    assert rows[1]["predicted_speedup"] is None and iid_accepted(1.0, 4) == 4
    m.heads = None  # no heads: the logit lens at candidate exits, so any model shows where early exit could pay
    bare = exit_costs(m, gamma=2, repeats=2, context=16)
    assert [r["exit_layer"] for r in bare] == candidate_exits(m.lm.num_layers)
    assert all(r["heldout_agreement"] is None and r["predicted_speedup"] is None for r in bare)
    with pytest.raises(ValueError, match="attach --heads"):
        exit_costs(m, gamma=2, draft_vocab=64)
    assert candidate_exits(30) == [5, 10, 15, 20, 25] and candidate_exits(4) == [1, 2, 3]


def test_info_prints_step_and_self_spec_costs(tmp_path, capsys):
    from conftest import save_tiny_model
    from exitspec.cli import main
    from exitspec.decoding.spec_costs import candidate_exits

    folder = save_tiny_model(tmp_path / "model")
    HeadBundle.create(exitspec.load(str(folder)).lm, [2, 4], "norm_lm").save(tmp_path / "heads")
    assert main(["info", "--model", str(folder), "--heads", str(tmp_path / "heads"), "--context", "16",
                 "--draft-len", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "decode step after 16 cached tokens" in out and "self-spec cycle per exit, 2 drafts" in out
    steps = out.split("decode step after 16 cached tokens (ms, fastest of 20 interleaved rounds):\n")[1].splitlines()
    assert steps[0].split()[:6] == ["k", "step", "embed", "layers", "attn", "mlp"]
    assert [line.split()[0] for line in steps[1:5]] == ["1", "2", "4", "8"]
    table = out.split("break-even  needs agreement predicted\n")[1].splitlines()
    assert [line.split()[0] for line in table] == ["2", "4"]
    assert main(["info", "--model", str(folder), "--context", "16", "--threads", "1"]) == 0  # no heads
    out = capsys.readouterr().out
    assert "no heads attached: candidate exits" in out
    table = out.split("break-even  needs agreement predicted\n")[1].splitlines()
    layers = exitspec.load(str(folder)).lm.num_layers
    assert [line.split()[0] for line in table] == [str(x) for x in candidate_exits(layers)]


def test_info_refuses_impossible_draft_settings(tmp_path, capsys):
    from conftest import save_tiny_model
    from exitspec.cli import main

    folder = save_tiny_model(tmp_path / "model")
    HeadBundle.create(exitspec.load(str(folder)).lm, [2], "norm_lm").save(tmp_path / "heads")
    assert main(["info", "--model", str(folder), "--heads", str(tmp_path / "heads"), "--context", "8",
                 "--draft-len", "0"]) == 2
    assert "--draft-len must be >= 1 (got 0)" in capsys.readouterr().err
