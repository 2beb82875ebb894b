"""Exit heads that are a decoder layer of the base architecture (heads/block.py): Kangaroo's adapter
(init "new") and the research plan's Option B (init "copy", `train --ft-last-block`).

They start where they should (the logit lens of their layer, or of the next one), read the same
logits one position at a time while decoding as over a whole sequence, keep self-speculation
lossless, train, save and load, and are refused with a clear message where a strategy cannot keep
their state."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import FAMILIES, tiny_loaded
from exitspec.decoding.exits import StrategyOptionError
from exitspec.heads.bundle import HeadBundle
from exitspec.heads.kinds import make_head
from exitspec.runtime.sequences import teacher_pass
from helpers_strategies import PROMPTS, greedy

IDS = torch.tensor([[5, 17, 33, 2, 60, 41, 7, 9, 3, 3, 12, 50, 8]])


def perturbed(head, scale: float = 0.02, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return head


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_block_heads_are_the_logit_lens_of_their_layer_or_the_next(family):
    m = tiny_loaded(family)
    tp = teacher_pass(m.lm, IDS, [2, 3])
    with torch.no_grad():
        new = make_head("block", m.lm, 2, init="new")(tp.hidden[2])
        copy = make_head("block", m.lm, 2, init="copy", tune_head=True)(tp.hidden[2])
    torch.testing.assert_close(new, make_head("norm_lm", m.lm, 2)(tp.hidden[2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(copy, make_head("norm_lm", m.lm, 3)(tp.hidden[3]), rtol=0, atol=1e-5)
    assert make_head("block", m.lm, 2).layers_run == 3
    with pytest.raises(ValueError, match="init must be one of"):
        make_head("block", m.lm, 2, init="random")


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_one_position_at_a_time_reads_what_the_whole_sequence_gives(family):
    """transform_at against the decode cache (catching up on the positions it has not seen, after a
    rollback too) equals the full-sequence transform that training and evaluation use."""
    m = tiny_loaded(family)
    head = perturbed(make_head("block", m.lm, 2, init="copy"))
    h = teacher_pass(m.lm, IDS, [2]).hidden[2]  # (1, T, C)
    T = h.shape[1]
    with torch.no_grad():
        full = head.transform(h)
        cache = m.lm.new_cache(1, T + 4, hidden_layer=2, head_cache=torch.float32)
        cache.keep_hidden(h, torch.arange(T)[None])  # what prefill and drafting keep
        got = [head.transform_at(h[:, 5:7], torch.tensor([[5, 6]]), cache)]  # catches up on 0..4 first
        for t in range(7, T):
            if t == 9:
                cache.rollback(8)  # a rejected draft at 8: recomputed from the kept state
            got.append(head.transform_at(h[:, t:t + 1], torch.tensor([[t]]), cache))
    torch.testing.assert_close(torch.cat(got, 1), full[:, 5:], rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="head_cache"):
        head.transform_at(h[:, :1], torch.tensor([[0]]), m.lm.new_cache(1, T, hidden_layer=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_self_spec_with_block_heads_is_lossless_and_a_copy_of_the_last_layer_drafts_perfectly(family):
    m = tiny_loaded(family)
    L = m.lm.num_layers
    bundle = HeadBundle.create(m.lm, [2, L - 1], "block", base_model=m.name, init="copy")
    perturbed(bundle.head(2))
    m.heads = bundle
    ref = greedy(m, PROMPTS, n=30)
    for layer, k in ((2, 3), (L - 1, 4)):
        out = greedy(m, PROMPTS, n=30, strategy="self-spec", exit_layer=layer, draft_len=k)
        assert out.token_ids == ref.token_ids, layer  # a ragged batch of 4
        one = greedy(m, PROMPTS[2], n=30, strategy="self-spec", exit_layer=layer, draft_len=k)
        assert one.token_ids[0] == ref.token_ids[2], layer  # batch 1
    # The untuned copy of layer L-1 after exit L-1 IS the full model: every draft is accepted, which
    # needs the head's own keys / values right at every position (prompt, drafts, accepted tokens).
    assert out.stats.accepted == out.stats.drafted > 0
    # Every token ran L layers (drafted below the exit, verified above it) plus the head's own layer.
    assert out.stats.layers_per_token > L


def test_strategies_that_cannot_keep_a_block_heads_state_refuse_it():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2, 4], "block", base_model=m.name)
    for strategy, kw in (("cascade", dict(exit_layers=[2, 4], threshold=0.5)),
                         ("dssd", dict(exit_layers=[2, 4], threshold=0.5)), ("mlp-skip", dict(exit_layer=2))):
        with pytest.raises(StrategyOptionError, match="only self-spec drafts with it"):
            greedy(m, PROMPTS[:1], n=4, strategy=strategy, **kw)


def test_a_block_bundle_saves_and_loads_the_same_logits(tmp_path):
    m = tiny_loaded("qwen2")
    bundle = HeadBundle.create(m.lm, [3], "block", base_model=m.name, init="copy", tune_head=True)
    perturbed(bundle)
    bundle.save(tmp_path / "b", dtype=torch.float32)
    back = HeadBundle.load(tmp_path / "b", m.lm)
    assert back.config.head_options["3"] == {"init": "copy", "tune_head": True}
    h = teacher_pass(m.lm, IDS, [3]).hidden[3]
    with torch.no_grad():
        torch.testing.assert_close(back.head(3)(h), bundle.head(3)(h))


def test_learned_estimators_refuse_block_heads():
    from exitspec.heads.confidence import position_wise

    m = tiny_loaded("llama")
    with pytest.raises(ValueError, match="max_prob, entropy or margin"):
        position_wise(make_head("block", m.lm, 2))


def test_ft_last_block_trains_option_b_against_the_head_alone_at_the_same_exits(tmp_path):
    """`train --ft-last-block`: exit l as an LM head alone and as layer l-1 tuned with the LM head
    (a block head at l-1, l layers run either way), compared on held-out answers in one table."""
    from exitspec.cli import main
    from test_training import _cli_setup

    cfg = _cli_setup(tmp_path)
    out = tmp_path / "optb"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--work", str(tmp_path / "w"), "--no-progress",
                 "--ft-last-block", "--eval-per-set", "1", "gen_max_new_tokens=4", "epochs=1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ft-last-block", "head-only", "sweep-eval"]
    with open(out / "sweep-eval" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by = {(r["bundle"], r["layers_run"]): r for r in rows}
    for exit_layer in ("2", "4"):  # the config's exits
        assert by[("head-only", exit_layer)]["kind"] == "lm_head"
        option_b = by[("ft-last-block", exit_layer)]
        assert option_b["kind"] == "block" and int(option_b["layer"]) == int(exit_layer) - 1
    assert (out / "sweep-eval" / "layer_sweep.pdf").is_file()
    assert main(["train", "--config", str(cfg), "--out", str(out), "--ft-last-block", "layers=[1,3]"]) == 2
