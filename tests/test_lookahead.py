"""The lookahead draft head: its untrained identity, training on a tiny model's own greedy text, trees
with its drafts equal to vanilla token for token (per-layer path and the fused int4 stack), seeded
sampling independent of the batch, bundle persistence and refusals of bad settings."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch

from conftest import tiny_loaded
from exitspec.commands.train_lookahead import corpus_answers
from exitspec.decoding.api import make_strategy
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.lookahead import LookaheadDrafter
from exitspec.heads.bundle import HeadBundle
from exitspec.heads.lookahead import LookaheadConfig, LookaheadHead, unit_rms
from exitspec.prompts import Prompt
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.sequences import TokenSequence
from exitspec.training.lookahead import (
    LookaheadTrainConfig,
    Objective,
    collect_features,
    evaluate_lookahead,
    train_lookahead,
)
from helpers_strategies import PROMPTS, greedy
from test_int4 import quantized_tiny

VOCAB = torch.arange(96)  # the character tokenizer's whole vocabulary


def own_text(m, n: int = 48) -> list[TokenSequence]:
    """The tiny model's greedy continuations of the test prompts and a few more, as training sequences."""
    prompts = PROMPTS + [f"{chr(97 + i)}{i} text" for i in range(8)]
    out = greedy(m, prompts, n=n)
    ids = [m.tokenizer(p)["input_ids"] for p in prompts]
    return [TokenSequence(p + t, len(p)) for p, t in zip(ids, out.token_ids, strict=True)]


@cache
def trained_head_state(family: str) -> tuple[dict, dict]:
    """A head fitted to the tiny model's own text (a random model's text has little to generalise, so
    the head is scored on the text it was fitted to: what the test checks is that training fits it, and
    that decoding the same prompts then accepts its drafts)."""
    m = tiny_loaded(family)
    data = collect_features(m.lm, own_text(m))
    cfg = LookaheadTrainConfig(width=64, draft_vocab=96, epochs=40, batch=64, lr=3e-3, val_share=0)
    head, report = train_lookahead(m.lm, data, VOCAB, cfg, log=lambda s: None)
    report |= evaluate_lookahead(Objective(head, cfg), data, cfg.unroll)
    return {k: v.clone() for k, v in head.state_dict().items()}, report


def with_lookahead(m, family: str = "llama"):
    """m with a bundle holding the lookahead head trained on the same tiny model's text."""
    state, report = trained_head_state(family)
    head = LookaheadHead(m.lm, LookaheadConfig(width=64, draft_vocab=96))
    head.load_state_dict(state)
    m.heads = HeadBundle.create(m.lm, [2], "norm_lm")
    m.heads.set_lookahead(head.eval().requires_grad_(False), report)
    return m


@torch.inference_mode()
def test_an_untrained_head_returns_its_input_feature_and_drafts_the_current_positions_argmax():
    m = tiny_loaded("llama")
    lm = m.lm
    head = LookaheadHead(lm, LookaheadConfig(width=32, draft_vocab=96))
    h = torch.randn(3, lm.hidden_size) * 7
    f = unit_rms(h)
    torch.testing.assert_close(head(f, torch.tensor([1, 2, 3])), f)
    nodes = LookaheadDrafter(head, depth=1, topk=1, frontier=1).draft(h, [5, 6, 7])
    assert [n.tokens for n in nodes] == [[t] for t in lm.logits(h).argmax(-1).tolist()]


def test_training_fits_the_models_own_text_better_than_the_untrained_head_drafts_it():
    _, report = trained_head_state("llama")
    assert set(report) >= {"val_top1_by_step", "val_chain_acceptance", "val_first_step_topk", "train_windows"}
    top1 = report["val_top1_by_step"]
    chain = report["val_chain_acceptance"]
    assert len(top1) == 3 and chain[0] == top1[0] and chain[2] <= chain[1] <= chain[0]
    assert report["val_first_step_topk"][4] >= report["val_first_step_topk"][1]
    # The untrained head drafts "the token just chosen, again": a repeat is right this often.
    seqs = own_text(tiny_loaded("llama"))
    repeats = sum(s.ids[t + 1] == s.ids[t] for s in seqs for t in range(s.start, len(s.ids) - 1))
    total = sum(len(s.ids) - 1 - s.start for s in seqs)
    assert top1[0] > 0.5 > repeats / total


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_trees_with_lookahead_drafts_are_vanilla_token_for_token(family):
    m = with_lookahead(tiny_loaded(family), family)
    ref = greedy(m, PROMPTS, n=40)
    for opts in ({}, {"adaptive": False, "max_nodes": 24, "topk": 3, "frontier": 2, "lookahead_depth": 3},
                 {"datastore": False, "width": 1, "depth": 2, "lookahead_always": False}):
        strat = make_strategy("tree", m, lookahead=True, **opts)
        assert strat.lookahead is not None
        out = greedy(m, PROMPTS, n=40, strategy=strat)
        assert out.token_ids == ref.token_ids, opts
        assert strat.head_accepted > 1.0  # some lookahead nodes were accepted (the record starts at 1)
    off = make_strategy("tree", m)  # off by default
    assert off.lookahead is None and greedy(m, PROMPTS, n=40, strategy=off).token_ids == ref.token_ids


def test_lookahead_trees_on_the_fused_int4_stack_are_vanilla_token_for_token(kernel_isa):
    m = quantized_tiny("llama")
    assert m.lm.adapter.fused
    m = with_lookahead(m, "llama")  # trained on the dense twin: drafts differ, output may not
    ref = greedy(m, PROMPTS, n=40)
    strat = make_strategy("tree", m, adaptive=False, max_nodes=20, lookahead=True)
    assert greedy(m, PROMPTS, n=40, strategy=strat).token_ids == ref.token_ids
    assert strat.cycles["tree"] > 0 and strat.head_expected > 1.0


def test_sampled_trees_with_lookahead_drafts_repeat_with_their_seed():
    """Lookahead drafts are deterministic given the context (top-k, no sampling), which is what the
    tree's multi-candidate rejection rule needs to follow the target distribution (tree_verify.py,
    tested in test_token_tree.py)."""
    m = with_lookahead(tiny_loaded("llama"))
    outs = []
    for _ in range(2):
        strat = make_strategy("tree", m, lookahead=True)
        outs.append(greedy(m, PROMPTS[:2], n=30, strategy=strat, temperature=0.8, seed=7))
        assert strat.head_expected > 1.0  # lookahead nodes went into the sampled rows' trees
    assert outs[0].token_ids == outs[1].token_ids and all(len(t) == 30 for t in outs[0].token_ids)


def test_a_bundle_keeps_its_lookahead_head_and_refuses_a_damaged_one(tmp_path):
    m = with_lookahead(tiny_loaded("llama"))
    ref = greedy(m, PROMPTS[:2], n=30, strategy="tree", lookahead=True)
    m.heads.save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert cfg["format_version"] == 3 and cfg["lookahead"]["config"] == {"width": 64, "draft_vocab": 96}
    back = HeadBundle.load(tmp_path / "b", m.lm)
    for k, v in m.heads.lookahead.state_dict().items():
        assert torch.equal(back.lookahead.state_dict()[k], v)
    m.heads = back
    assert greedy(m, PROMPTS[:2], n=30, strategy="tree", lookahead=True).token_ids == ref.token_ids
    cfg["lookahead"]["config"]["width"] = 0
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lookahead head settings are invalid"):
        HeadBundle.load(tmp_path / "b", m.lm)


def test_bad_lookahead_settings_are_refused_with_what_to_do():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2], "norm_lm")
    with pytest.raises(StrategyOptionError, match="lookahead=true needs a head bundle with a lookahead head"):
        make_strategy("tree", m, lookahead=True)
    with pytest.raises(StrategyOptionError, match="lookahead must be true or false"):
        make_strategy("tree", m, lookahead="yes")
    with_lookahead(m)
    with pytest.raises(StrategyOptionError, match="topk must be an integer >= 1"):
        make_strategy("tree", m, lookahead=True, topk=0)
    with pytest.raises(StrategyOptionError, match="lookahead_depth 5 is deeper than the tree"):
        make_strategy("tree", m, lookahead=True, lookahead_depth=5)
    with pytest.raises(StrategyOptionError, match="sampled_nodes must be an integer in 2..max_nodes \\(16\\)"):
        make_strategy("tree", m, sampled_nodes=17)
    with pytest.raises(ValueError, match="exceeds the model's vocabulary"):
        LookaheadHead(LayeredModel(m.model), LookaheadConfig(width=8, draft_vocab=1000))
    with pytest.raises(ValueError, match="width must be a positive integer"):
        LookaheadTrainConfig(width=0)
    data = collect_features(m.lm, own_text(m)[:2])
    with pytest.raises(ValueError, match="does not match the settings"):  # go on from a head of another shape
        train_lookahead(m.lm, data, VOCAB, LookaheadTrainConfig(width=32, draft_vocab=96, epochs=0.1),
                        log=lambda s: None, init=m.heads.lookahead)


def test_datastore_answers_are_paired_with_their_prompts_or_refused():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2], "norm_lm")
    prompts = [Prompt(text=t) for t in ("abc", "defg", "hij")]
    tok = m.tokenizer
    answers = [tok(p.text)["input_ids"][-3:] + tok(" ok")["input_ids"] for p in prompts]
    m.heads.set_draft_corpus(answers, source="test")
    seqs = corpus_answers(m, prompts, 0)
    assert [s.ids[s.start:] for s in seqs] == [tok(" ok")["input_ids"]] * 3
    with pytest.raises(ValueError, match="holds 3 answers but --data gives 2 prompts"):
        corpus_answers(m, prompts[:2], 0)
    m.heads.set_draft_corpus(answers[::-1], source="test")
    with pytest.raises(ValueError, match="not built from --data's prompts in this order"):
        corpus_answers(m, prompts, 0)


def test_the_command_adds_a_lookahead_head_and_keeps_the_rest_of_the_bundle(tmp_path):
    """`exitspec train-lookahead`: answers generated for a prompt file's train split (then again from the
    datastore that `exitspec datastore` makes of them), a head trained on them, the bundle copied."""
    from conftest import save_tiny_model
    from exitspec.cli import main
    from exitspec.loading import load

    folder = save_tiny_model(tmp_path / "m", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    m = load(str(folder))
    HeadBundle.create(m.lm, [2], "norm_lm").save(tmp_path / "b")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"question number {i}?"}) for i in range(10)) + "\n")
    common = ["--model", str(folder), "--data", str(prompts), "--max-new-tokens", "12", "--work", str(tmp_path / "w"),
              "--no-progress"]
    args = ["--width", "32", "--draft-vocab", "96", "--epochs", "2"]
    assert main(["train-lookahead", *common, *args, "--heads", str(tmp_path / "b"), "--answers", "generate",
                 "--out", str(tmp_path / "new")]) == 0
    new = HeadBundle.load(tmp_path / "new", m.lm)
    assert new.lookahead is not None and new.config.exit_layers == [2]
    assert new.config.lookahead["config"] == {"width": 32, "draft_vocab": 96}
    assert new.config.lookahead["training"]["answers"] == "generate"
    # The same answers as a datastore, then the head again from it: no generation.
    assert main(["datastore", *common, "--heads", str(tmp_path / "new"), "--out", str(tmp_path / "ds")]) == 0
    ds = str(tmp_path / "ds")
    assert main(["train-lookahead", *common, *args, "--heads", ds, "--out", ds]) == 0
    again = HeadBundle.load(tmp_path / "ds", m.lm)
    assert again.config.lookahead["training"]["answers"] == "corpus" and again.draft_sequences()
    # Without --heads the command says what it needs.
    assert main(["train-lookahead", *common, "--out", str(tmp_path / "x")]) == 2
