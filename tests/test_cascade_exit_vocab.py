"""cascade's exit_vocab: exits decide and emit over the N most frequent tokens, never the full LM head."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_loaded
from exitspec.bench.costs import cost_split
from exitspec.bench.routing import route
from exitspec.decoding.api import make_strategy
from exitspec.decoding.draft_vocab import draft_vocabulary
from exitspec.decoding.exits import StrategyOptionError
from exitspec.heads.bundle import HeadBundle
from helpers_bench import cascade_decoded_and_routed
from helpers_strategies import PROMPTS, reference_hidden, tokens_and_exits, with_heads

LAYERS = [2, 4]
N = 32


def frequent(m, n: int = N, every: int = 3) -> None:
    """Give the tiny model's bundle a token frequency list (every `every`-th id first)."""
    V = m.lm.vocab_size
    m.heads.config.training["token_frequencies"] = list(range(0, V, every)) + [t for t in range(V) if t % every]


def model(thresholds: float = 0.45):
    m = with_heads("llama", thresholds={k: thresholds for k in LAYERS})
    frequent(m)
    return m


def test_exit_vocab_zero_is_todays_cascade():
    m = model()
    kw = dict(n=30, strategy="cascade", exit_layers=LAYERS)
    assert tokens_and_exits(m, PROMPTS[:3], exit_vocab=0, **kw) == tokens_and_exits(m, PROMPTS[:3], **kw)
    s = make_strategy("cascade", m, exit_layers=LAYERS)
    assert s.describe()["exit_vocab"] == 0 and all(e.vocab is None for e in s.exits)


def test_exited_tokens_are_the_subsets_argmax_and_never_pay_the_full_head(monkeypatch):
    m = model()
    vocab = draft_vocabulary(m, N, m.heads)
    assert vocab.numel() == N
    L = m.lm.num_layers
    s = make_strategy("cascade", m, exit_layers=LAYERS, exit_vocab=N, threshold=0.45, max_deferred=4)
    assert s.describe()["exit_vocab"] == N and s.describe()["precheck_vocab"] is None
    head_type = type(m.heads.head(2))
    full_calls = []
    forward = head_type.forward

    def counting(self, *a, **k):
        full_calls.append(self.layer)
        return forward(self, *a, **k)

    monkeypatch.setattr(head_type, "forward", counting)
    tokens_and_exits(m, PROMPTS[:3], n=30, strategy="cascade", exit_layers=LAYERS, threshold=0.45, precheck_vocab=0)
    assert full_calls  # the spy sees today's exits run their full heads
    full_calls.clear()
    toks, exits = tokens_and_exits(m, PROMPTS[:3], n=30, strategy=s)
    monkeypatch.setattr(head_type, "forward", forward)
    assert full_calls == []  # with exit_vocab no exit ran its full LM head
    counts = s.cost_counts()
    assert counts["exit_heads"] == 0 and counts["precheck_heads"] == 0 and counts["vocab_heads"] > 0
    rows = sum(e.vocab_rows for e in s.exits)
    assert counts["vocab_heads"] == pytest.approx(rows * N / m.lm.vocab_size)
    seen = set()
    for row, prompt in enumerate(PROMPTS[:3]):
        ids = m.tokenizer(prompt)["input_ids"] + toks[row]
        hs = reference_hidden(m.lm, ids[:-1])  # deferred recomputation: every state is the full model's
        start = len(ids) - 1 - len(toks[row])
        for i, (t, e) in enumerate(zip(toks[row], exits[row], strict=True)):
            h = hs[e][start + i]
            if e == L:
                assert int(m.lm.logits(h).argmax()) == t, (row, i)
            else:
                sub = m.heads.head(e)(h[None, None])[0, 0][vocab]
                assert t in vocab.tolist() and int(vocab[sub.argmax()]) == t, (row, i, e)
            seen.add(e)
    assert seen & set(LAYERS) and L in seen, seen  # some tokens exited, some went to the top


def test_the_subsets_gate_is_renormalised():
    """Renormalised over fewer tokens, max-prob can only rise: more tokens exit at the same threshold."""
    m = model(0.6)
    kw = dict(n=30, strategy="cascade", exit_layers=LAYERS, precheck_vocab=0)
    _, full = tokens_and_exits(m, PROMPTS[:3], **kw)
    _, sub = tokens_and_exits(m, PROMPTS[:3], exit_vocab=8, threshold=0.6, **kw)
    L = m.lm.num_layers
    assert sum(e < L for r in sub for e in r) > sum(e < L for r in full for e in r)


def test_routing_is_exactly_what_exit_vocab_decodes():
    m = tiny_loaded("gpt2")
    m.heads = HeadBundle.create(m.lm, LAYERS, "norm_lm")
    frequent(m, every=2)
    opts = dict(exit_layers=LAYERS, threshold="0.3,0.2", score="max_prob", exit_vocab=48)
    scorer, prompt, gen, routed = cascade_decoded_and_routed(m, opts)
    assert routed.argmax(-1).tolist() == gen
    vocab = draft_vocabulary(m, 48, m.heads)
    outside = torch.ones(m.lm.vocab_size, dtype=torch.bool)
    outside[vocab] = False
    r = route(m, scorer.routing_strategy, prompt + gen, len(prompt))
    exited = (r.layer < m.lm.num_layers).nonzero()[:, 0].tolist()
    assert exited
    for i in exited:  # an exited position's distribution is the subset's: -inf outside it, sums to 1
        assert torch.isneginf(routed[i, outside]).all()
        assert float(routed[i].exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_per_exit_thresholds_and_bad_options_are_refused():
    m = model()
    s = make_strategy("cascade", m, exit_layers=LAYERS, threshold="0.3,0.7", exit_vocab=N)
    assert {e.layer: e.gate.value for e in s.exits} == {2: 0.3, 4: 0.7}
    V = m.lm.vocab_size
    bad = [(dict(exit_vocab=-1, threshold=0.5), "exit_vocab must be"),
           (dict(exit_vocab=True, threshold=0.5), "exit_vocab must be"),
           (dict(exit_vocab=V + 1, threshold=0.5), "larger than the model's vocabulary"),
           (dict(exit_vocab=N), "pass threshold="),  # the bundle's thresholds are full-vocabulary ones
           (dict(exit_vocab=N, threshold=0.5, adapt=0.5), "adapt"),
           (dict(exit_vocab=N, threshold="0.5,0.6,0.7"), "3 thresholds for 2 exits")]
    for opts, match in bad:
        with pytest.raises(StrategyOptionError, match=match):
            make_strategy("cascade", m, exit_layers=LAYERS, **opts)
    del m.heads.config.training["token_frequencies"]
    with pytest.raises(StrategyOptionError, match="token frequency list"):
        make_strategy("cascade", m, exit_layers=LAYERS, exit_vocab=N, threshold=0.5)
    # thresholds the bundle stored for this exit_vocab are used without threshold=, and only with it
    frequent(m)
    for layer in LAYERS:
        m.heads.config.thresholds[str(layer)]["exit_vocab"] = N
    assert make_strategy("cascade", m, exit_layers=LAYERS, exit_vocab=N).exits[0].gate.value == 0.45
    with pytest.raises(StrategyOptionError, match="pass threshold="):
        make_strategy("cascade", m, exit_layers=LAYERS, exit_vocab=N // 2)
    assert make_strategy("cascade", m, exit_layers=LAYERS, threshold=0.5).exits[0].vocab is None


def test_cost_split_counts_the_exit_vocabulary_as_gate_work():
    c = cost_split(6, 2.0, 4, 20.0, {2: 3, 6: 1}, {"precheck_heads": 0.0, "exit_heads": 0.0, "vocab_heads": 1.0})
    assert c["gates"] == pytest.approx(1.0 * 2.0 / 4) and c["head"] == pytest.approx(2.0 / 4)
    assert c["total"] == pytest.approx(3 + 2 + 0.5 + 0.5)


def test_calibrating_for_an_exit_vocabulary():
    """collect(vocab=...) scores the subset's renormalised distribution and its top-1; the thresholds
    it yields carry N and serve only a cascade with exit_vocab=N."""
    from exitspec.calibration.calibrate import calibrate_bundle
    from exitspec.calibration.collect import collect
    from exitspec.heads.confidence import scores
    from exitspec.runtime.sequences import scored_rows, scored_sequence, teacher_forward

    m = model()
    g = torch.Generator().manual_seed(0)
    seqs = [scored_sequence(torch.randint(0, 95, (24,), generator=g).tolist(), 6) for _ in range(6)]
    vocab = draft_vocabulary(m, N, m.heads)
    data = collect(m.lm, {"h": m.heads}, seqs, vocab=vocab).exits["h"]
    full = collect(m.lm, {"h": m.heads}, seqs).exits["h"]
    assert not torch.equal(data[2].scores["max_prob"], full[2].scores["max_prob"])
    assert torch.equal(data[2].kl, full[2].kl)  # the other statistics stay the full head's
    full_logits, whole = teacher_forward(m.lm, seqs[0], [2], whole=True)
    sub = m.heads.head(2).rows(whole[2], scored_rows(seqs[0]))[:, vocab]
    n0 = sub.shape[0]
    torch.testing.assert_close(data[2].scores["max_prob"][:n0], scores(sub)["max_prob"].cpu())
    assert torch.equal(data[2].agree[:n0], (vocab[sub.argmax(-1)] == full_logits.argmax(-1)).cpu())
    entries = calibrate_bundle(m.heads, data, 0.5, "max_prob", exit_vocab=N)
    assert all(e["exit_vocab"] == N for e in entries.values())
    s = make_strategy("cascade", m, exit_layers=LAYERS, exit_vocab=N)  # no threshold= needed now
    assert {e.layer: e.gate.value for e in s.exits} == {k: entries[k]["value"] for k in LAYERS}
    with pytest.raises(StrategyOptionError, match="calibrated on exit_vocab=32"):
        make_strategy("cascade", m, exit_layers=LAYERS)  # the full-vocabulary cascade may not use them
    with pytest.raises(StrategyOptionError, match="calibrated on exit_vocab=32"):
        make_strategy("dssd", m, exit_layers=LAYERS)
    with pytest.raises(ValueError, match="learned estimator"):
        collect(m.lm, {"h": m.heads}, seqs, vocab=vocab, keep_features=True)


def test_the_calibrate_command_takes_exit_vocab(tmp_path):
    import json

    from conftest import save_tiny_model
    from exitspec.cli import main
    from exitspec.loading import load
    from helpers_calibration import write_prompt_file

    model_dir = save_tiny_model(tmp_path / "tiny")
    m = load(str(model_dir))
    m.heads = HeadBundle.create(m.lm, LAYERS, "norm_lm")
    frequent(m)
    m.heads.save(tmp_path / "heads")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl", 20)
    common = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "8", "--threads", "1",
              "--target", "0.5", "--score", "max_prob"]
    out = tmp_path / "cal"
    assert main(["calibrate", "--heads", str(tmp_path / "heads"), "--exit-vocab", str(N), "--out", str(out),
                 *common]) == 0
    entries = json.loads((out / "bundle.json").read_text())["thresholds"]
    assert {e["exit_vocab"] for e in entries.values()} == {N} and set(entries) == {"2", "4"}
    # a bundle without a frequency list is refused with a message (exit status 2)
    assert main(["calibrate", "--heads", "norm_lm:2,4", "--exit-vocab", str(N), "--out", str(tmp_path / "x"),
                 *common]) == 2
