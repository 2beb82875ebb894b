"""Head training: data and masks, losses, one teacher pass, KL goes down, exact resume, CLI, accelerate."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_model, tiny_loaded
from exitspec.calibration.evaluate import evaluate_heads
from exitspec.commands.train import heldout_eval
from exitspec.heads.bundle import HeadBundle
from exitspec.runtime.sequences import TokenSequence, teacher_pass
from exitspec.training.config import TrainConfig
from exitspec.training.data import (
    HEADER_TOKENS,
    DistillSettings,
    collate,
    eval_sequences,
    read_source,
    self_distill,
)
from exitspec.training.losses import VocabSubset, kd_loss
from exitspec.training.teacher import compute_targets
from exitspec.training.trainer import Trainer, lr_factor
from helpers_training import random_examples, write_chat_jsonl

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cfg(**kw) -> TrainConfig:
    base = dict(model="tiny", layers=[2, 4], kind="swiglu", head_options={"width": 16}, batch_size=4,
                epochs=2, lr=3e-3, warmup_steps=2, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


# --- config ------------------------------------------------------------------------------------------
def test_config_file_sections_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('layers = [3, 1]\nkind = "linear"\n[optim]\nlr = 0.01\n[head_options]\nwidth = 8\n')
    cfg = TrainConfig.from_file(p, ["lr=3e-4", "data=some/file.jsonl", "answer_only=true"])
    assert cfg.layers == [1, 3] and cfg.kind == "linear" and cfg.lr == 3e-4
    assert cfg.head_options == {"width": 8} and cfg.data == "some/file.jsonl" and cfg.answer_only is True
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_file(p, ["learning_rate=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        TrainConfig.from_file(p, ["lr"])
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_file(tmp_path / "missing.toml")


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 4, 20, 0.1) for s in range(20)]
    assert f[0] == 0.25 and f[3] == 1.0 and all(a >= b for a, b in zip(f[3:], f[4:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=0.01)


# --- data -----------------------------------------------------------------------------------------------
def test_collate_masks_padding_first_token_and_prompt():
    ex = [TokenSequence([5, 6, 7, 8, 9], 3), TokenSequence([1, 2, 3], 1)]
    b = collate(ex, pad_id=0)
    assert b.ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert b.mask.tolist() == [[False, True, True, True, True], [False, True, True, False, False]]
    assert b.labels.tolist() == [[6, 7, 8, 9, -100], [2, 3, -100, -100, -100]]
    a = collate(ex, pad_id=0, answer_only=True)
    # position 2 (last prompt token) predicts the first answer token
    assert a.mask.tolist()[0] == [False, False, True, True, True]


def test_multi_turn_conversations_train_on_every_reply(tmp_path):
    from conftest import char_tokenizer
    from exitspec.prompts import load_prompts
    from exitspec.training.data import build_examples
    from helpers_server import CHAT_TEMPLATE

    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    conv = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}, {"from": "human", "value": "q3"}]
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "conversations": conv}) + "\n" for i in range(10)))
    prompt = load_prompts(data)[0]
    assert [t["role"] for t in prompt.turns] == ["user", "assistant", "user", "assistant"]  # system, last q dropped
    cfg = _cfg(data=str(data), self_distill=False, answer_only=True)
    seqs = build_examples(SimpleNamespace(tokenizer=tok), cfg, tmp_path)
    seq = seqs[0]
    assert tok.decode(seq.ids) == "<user>q1<assistant>a1<user>q2<assistant>a2"
    assert "".join(tok.decode([t]) for t, a in zip(seq.ids, seq.answer, strict=True) if a) == "a1a2"
    batch = collate([seq], pad_id=0, answer_only=True)
    trained = [int(batch.labels[0, t]) for t in range(len(seq.ids)) if batch.mask[0, t] and batch.labels[0, t] >= 0]
    assert tok.decode(trained) == "a1a2"  # the second user turn is context, not a target
    first_only = build_examples(SimpleNamespace(tokenizer=tok), _cfg(data=str(data), self_distill=False,
                                                                       multi_turn=False), tmp_path)[0]
    assert tok.decode(first_only.ids) == "<user>q1<assistant>a1" and first_only.answer is None


def test_read_source_formats_use_the_train_split_only(tmp_path):
    chat = write_chat_jsonl(tmp_path / "chat.jsonl", n=10)
    prompts, plain = read_source(str(chat))
    assert [p.text for p in prompts] == [f"say {i} twice" for i in range(8)]  # last 20% held out
    assert prompts[0].reference == "0 0." and plain == []
    mt = tmp_path / "mt.jsonl"
    mt.write_text("\n".join(json.dumps({"question_id": i, "turns": [f"q{i}", "more"]}) for i in range(5)))
    assert [p.text for p in read_source(str(mt))[0]] == ["q0", "q1", "q2", "q3"]
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(f"paragraph {i}" for i in range(5)))
    assert read_source(str(txt)) == ([], [f"paragraph {i}" for i in range(4)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source(str(tmp_path / "nope.jsonl"))


def test_self_distill_generates_once_and_checks_the_cache(tmp_path, monkeypatch):
    import exitspec
    from exitspec.prompts import Prompt

    m = tiny_loaded("llama")
    prompts = [Prompt("abc"), Prompt("hello"), Prompt("xy")]
    cache = tmp_path / "d.jsonl"
    first = self_distill(m, prompts, cache, DistillSettings(max_new_tokens=5, batch=2), progress=False)
    ref = exitspec.generate(m, "hello", max_new_tokens=5)
    assert first[1].ids == first[1].ids[: first[1].start] + ref.token_ids[0]

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(exitspec, "generate", boom)
    again = self_distill(m, prompts, cache, DistillSettings(max_new_tokens=5, batch=2), progress=False)
    assert [e.ids for e in again] == [e.ids for e in first]
    with pytest.raises(ValueError, match="other settings"):
        self_distill(m, prompts, cache, DistillSettings(max_new_tokens=6), progress=False)


def test_cached_self_distill_gives_the_same_sequences_as_greedy_sequences(tmp_path):
    """`train --eval-per-set` evaluates on cached self-distilled answers; `eval-heads` on
    calibration.greedy_sequences. Same prompts -> the same scored sequences, token for token."""
    from exitspec.calibration.sequences import greedy_sequences
    from exitspec.prompts import Prompt

    m = tiny_loaded("llama")
    prompts = [Prompt("abc"), Prompt("hello there"), Prompt("xy"), Prompt("a longer prompt, this one")]
    cached = eval_sequences(self_distill(m, prompts, tmp_path / "h.jsonl", DistillSettings(max_new_tokens=6, batch=3),
                                         progress=False))
    direct = greedy_sequences(m, prompts, max_new_tokens=6, batch_size=2)
    assert [(s.ids, s.start) for s in cached] == [(s.ids, s.start) for s in direct]


# --- teacher and losses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_teacher_pass_matches_hf_hidden_states(family):
    m = tiny_loaded(family)
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    tp = teacher_pass(m.lm, ids, [2, 4])
    with torch.no_grad():
        hf = m.model(ids, output_hidden_states=True)
    for layer in (2, 4):
        torch.testing.assert_close(tp.hidden[layer], hf.hidden_states[layer], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tp.logits, hf.logits, rtol=1e-4, atol=1e-4)
    tail = teacher_pass(m.lm, ids, [4, 2, 2], logits_from=5)  # LM head on positions 5.. only
    torch.testing.assert_close(tail.logits, tp.logits[:, 5:])
    assert sorted(tail.hidden) == [2, 4] and torch.equal(tail.hidden[2], tp.hidden[2])
    with pytest.raises(ValueError, match="must lie in"):
        teacher_pass(m.lm, ids, [m.lm.num_layers])


def test_eval_sequences_score_the_positions_training_scores():
    ex = [TokenSequence(list(range(10, 20)), 4), TokenSequence(list(range(30, 36)), 0), TokenSequence([5, 6, 7], 3)]
    seqs = eval_sequences(ex)
    assert len(seqs) == 2  # the last one has no answer token to score
    batch = collate(ex[:2], pad_id=0, answer_only=True)
    for b, s in enumerate(seqs):
        scored = (batch.mask[b] & (batch.labels[b] >= 0)).nonzero()[:, 0].tolist()
        assert scored == list(range(s.start - 1, len(s.ids) - 1))


def test_kd_loss_is_kl_with_temperature_scaling():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    assert kd_loss(t, t).abs().item() < 1e-6
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(kd_loss(s, t, 2.0), ref * 4)


def test_sparse_targets_with_full_topk_equal_dense_targets():
    m = tiny_loaded("llama")
    ex = random_examples(4)
    dense = compute_targets(m.lm, ex, [2], pad_id=0, batch_size=2, topk=0, answer_only=False, progress=False)
    sparse = compute_targets(m.lm, ex, [2], pad_id=0, batch_size=2, topk=m.lm.vocab_size, answer_only=False,
                             progress=False)
    vd = VocabSubset.from_targets(dense, m.lm.vocab_size, 0)
    vs = VocabSubset.from_targets(sparse, m.lm.vocab_size, 0)
    assert vd.ids is None and vs.size == m.lm.vocab_size
    torch.testing.assert_close(vd.teacher(dense[0]), vs.teacher(sparse[0]))
    small = VocabSubset.from_targets(sparse, m.lm.vocab_size, 10)
    labels = sparse[0].labels
    assert torch.equal(small.ids[small.labels(labels)[labels >= 0]], labels[labels >= 0])


# --- training ------------------------------------------------------------------------------------------------
OPTIONS = {"swiglu": {"width": 32}, "block": {"init": "new"}}


@pytest.mark.parametrize("kind", ["swiglu", "linear", "lm_head", "block"])
def test_a_few_steps_lower_the_kl(tmp_path, kind):
    m = tiny_loaded("llama")
    ex = random_examples(16)
    cfg = _cfg(kind=kind, head_options=OPTIONS.get(kind, {}), epochs=4, lr=1e-2)
    before = HeadBundle.create(m.lm, cfg.layers, "norm_lm")
    result = Trainer(m, cfg, ex, tmp_path, progress=False).train()
    rows = evaluate_heads(m, result.bundle, eval_sequences(ex), baseline=before, label="after")
    b_rows, a_rows = ([r for r in rows if r["bundle"] == name] for name in ("norm_lm", "after"))
    assert [r["layer"] for r in a_rows] == [r["layer"] for r in b_rows] == cfg.layers
    for b, a in zip(b_rows, a_rows, strict=True):
        assert a["kl"] < 0.9 * b["kl"], (kind, b, a)
    assert result.steps == 16 and result.tokens > 0


def test_sparse_kd_over_a_reduced_vocabulary_also_trains(tmp_path):
    m = tiny_loaded("llama")
    ex = random_examples(16)
    cfg = _cfg(epochs=4, lr=1e-2, kd_topk=8, kd_vocab=40, head_options={"width": 32})
    trained = Trainer(m, cfg, ex, tmp_path, progress=False).train().bundle
    stored = heldout_eval(m, trained, eval_sequences(ex))  # what `train --eval-per-set` keeps in bundle.json
    assert sorted(stored) == ["full", "norm_lm", "trained"]
    for layer in ("2", "4"):
        b, a = stored["norm_lm"][layer], stored["trained"][layer]
        assert a["kl"] < b["kl"] and a["tokens"] == b["tokens"] > 0, (b, a)
        assert set(a) == {"kl", "ppl", "agreement", "accuracy", "tokens"}


@pytest.mark.parametrize("sparse", [dict(kd_topk=8, kd_vocab=40), dict(kd_topk=0)], ids=["topk-subset", "dense"])
def test_streamed_teacher_trains_the_heads_the_cached_one_does(tmp_path, sparse):
    """The teacher inside each step (memory follows the batch) against one pass kept for all epochs:
    the same batches, the same KD vocabulary, the same heads up to float rounding (a sequence's
    teacher pass shares its call with other sequences in each mode, which moves low bits)."""
    m = tiny_loaded("llama")
    ex = random_examples(16)
    runs = {}
    for mode in ("cached", "streamed"):
        trainer = Trainer(m, _cfg(epochs=3, teacher=mode, **sparse), ex, tmp_path / mode, progress=False)
        runs[mode] = (trainer, trainer.train())
    (cached, a), (streamed, b) = runs["cached"], runs["streamed"]
    assert streamed.targets is None and cached.targets is not None and len(cached.targets) == 16
    if cached.vocab.ids is None:
        assert streamed.vocab.ids is None
    else:
        assert torch.equal(cached.vocab.ids, streamed.vocab.ids)
    assert a.steps == b.steps and a.tokens == b.tokens
    for x, y in zip(a.history, b.history, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
    ref = a.bundle.state_dict()
    for k, v in b.bundle.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="teacher must be"):
        _cfg(teacher="lazy")


def test_sparse_teacher_targets_cached_on_disk_train_the_same_heads(tmp_path):
    """teacher_cache: one full teacher pass writes the data set's top-k targets (memory-mapped); every
    step then runs the base only up to the deepest exit. Same heads as computing them each step; a
    second run reuses the file untouched; other data makes a new one."""
    m = tiny_loaded("llama")
    ex = random_examples(16)
    sparse = dict(kd_topk=8, kd_vocab=40, epochs=2)
    plain = Trainer(m, _cfg(**sparse), ex, tmp_path / "plain", progress=False)
    ref = plain.train()
    cache = tmp_path / "teacher"
    first = Trainer(m, _cfg(teacher_cache=str(cache), **sparse), ex, tmp_path / "c1", progress=False)
    got = first.train()
    assert first.sparse is not None and first.sparse.rows == sum(t.tokens for t in [first.targets_for([i])
                                                                                   for i in range(16)])
    assert torch.equal(first.vocab.ids, plain.vocab.ids)
    for k, v in got.bundle.state_dict().items():
        torch.testing.assert_close(v, ref.bundle.state_dict()[k], rtol=1e-4, atol=1e-5)
    stamp = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    again = Trainer(m, _cfg(teacher_cache=str(cache), **sparse), ex, tmp_path / "c2", progress=False).train()
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == stamp  # reused, not rewritten
    for k, v in again.bundle.state_dict().items():
        assert torch.equal(v, got.bundle.state_dict()[k]), k
    Trainer(m, _cfg(teacher_cache=str(cache), **sparse), random_examples(16, seed=5), tmp_path / "c3",
            progress=False).train(stop_after=1)
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} != stamp  # other data: rebuilt
    with pytest.raises(ValueError, match="teacher_cache keeps sparse targets"):
        _cfg(teacher_cache=str(cache), kd_topk=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no teacher cache"):  # never wipes a folder of other files
        Trainer(m, _cfg(teacher_cache=str(tmp_path / "busy"), **sparse), ex, tmp_path / "c4", progress=False).train()
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_resume_continues_from_the_same_step_and_matches(tmp_path):
    m = tiny_loaded("llama")
    ex = random_examples(16)
    cfg = _cfg(grad_accum=2, epochs=3, checkpoint_every=2)  # 2 micro-batches/step, 6 steps
    full = Trainer(m, cfg, ex, tmp_path / "a", progress=False).train()
    first = Trainer(m, cfg, ex, tmp_path / "b", progress=False)
    first.train(stop_after=3)
    assert first.step == 3
    second = Trainer(m, cfg, ex, tmp_path / "b", progress=False)
    resumed = second.train(resume=True)
    assert second.step == full.steps == 6 and second.micro == 12
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for k, v in full.bundle.state_dict().items():
        assert torch.equal(v, resumed.bundle.state_dict()[k]), k
    with pytest.raises(ValueError, match="different settings"):
        Trainer(m, _cfg(grad_accum=2, epochs=3, lr=0.5), ex, tmp_path / "b", progress=False).train(resume=True)


def test_checkpoints_are_safetensors_and_json_and_pickles_are_refused(tmp_path):
    from exitspec.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    m = tiny_loaded("llama")
    ex = random_examples(16)
    cfg = _cfg(epochs=1, checkpoint_every=1)
    Trainer(m, cfg, ex, tmp_path / "w", progress=False).train(stop_after=2)
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoint").iterdir()) == ["state.json", "tensors.safetensors"]
    state = load_checkpoint(tmp_path / "w" / "checkpoint")
    opt = state["opt"]["state"]
    assert state["step"] == 2 and opt and set(opt) == set(range(len(opt)))  # per-parameter keys stay ints
    # Any nest of data and tensors round-trips; what is neither is refused before anything is written.
    nest = {"a": (1, 2.5, None, "x"), 3: {"t": torch.arange(4)}, "b": [torch.ones(2, 2), True]}
    back = load_checkpoint(save_checkpoint(tmp_path / "c", nest))
    assert back["a"] == [1, 2.5, None, "x"] and torch.equal(back[3]["t"], torch.arange(4))
    assert torch.equal(back["b"][0], torch.ones(2, 2)) and back["b"][1] is True
    with pytest.raises(TypeError, match="holds no object"):
        save_checkpoint(tmp_path / "c", {"bad": object()})
    assert torch.equal(load_checkpoint(tmp_path / "c")[3]["t"], torch.arange(4))  # the earlier one is intact
    # A torn or foreign folder gets a message that says what to do.
    (tmp_path / "c" / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable.*delete"):
        load_checkpoint(tmp_path / "c")
    # A pickle checkpoint of an earlier exitspec is never unpickled, and is left where it was.
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"step": 1}, old / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*Delete it"):
        Trainer(m, cfg, ex, old, progress=False).train(resume=True)
    assert (old / "checkpoint.pt").is_file()


def test_norm_lm_and_bad_layers_are_refused(tmp_path):
    m = tiny_loaded("llama")
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(m, _cfg(kind="norm_lm", head_options={}), random_examples(8), tmp_path)
    with pytest.raises(ValueError, match="outside"):
        Trainer(m, _cfg(layers=[6]), random_examples(8), tmp_path)
    with pytest.raises(ValueError, match="fewer than one"):
        Trainer(m, _cfg(batch_size=32), random_examples(8), tmp_path)


# --- CLI and accelerate ---------------------------------------------------------------------------------------
def _cli_setup(tmp_path: Path) -> Path:
    save_tiny_model(tmp_path / "model")
    write_chat_jsonl(tmp_path / "chat.jsonl", n=20)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'model = "{tmp_path / "model"}"\nlayers = [2, 4]\nkind = "swiglu"\nthreads = 1\n'
                   f'[head_options]\nwidth = 16\n[data]\ndata = "{tmp_path / "chat.jsonl"}"\n'
                   'gen_max_new_tokens = 6\ngen_batch = 8\n[loss]\nkd_topk = 8\nkd_vocab = 40\n'
                   '[optim]\nepochs = 2\nbatch_size = 4\ncheckpoint_every = 1\n')
    return cfg


def test_cli_trains_and_saves_a_loadable_bundle(tmp_path):
    from exitspec.cli import main
    from exitspec.loading import load

    cfg = _cli_setup(tmp_path)
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "bundle"), "--work", str(tmp_path / "w"),
               "--no-progress", "lr=2e-3"])
    assert rc == 0
    bundle = HeadBundle.load(tmp_path / "bundle", load(str(tmp_path / "model")).lm)
    assert bundle.layers == [2, 4] and bundle.config.training["config"]["lr"] == 2e-3
    assert bundle.config.training["steps"] == 8 and (tmp_path / "w" / "distill.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["bundle.json", "heads.safetensors"]
    # The self-distilled answers (with the assistant header's last tokens) became lookup's draft datastore.
    lines = (tmp_path / "w" / "distill.jsonl").read_text().splitlines()[1:]
    answers = [json.loads(line)["answer_ids"] for line in lines]
    stored = bundle.draft_sequences()
    assert len(stored) == bundle.config.draft_corpus["sequences"] == 16  # the 16 train-split prompts
    assert sorted(s[HEADER_TOKENS:] for s in stored) == sorted(a for a in answers if a)


def test_cli_refuses_bad_settings_before_any_work_and_never_overwrites_a_run(tmp_path, capsys):
    from exitspec.cli import main

    cfg = _cli_setup(tmp_path)
    common = ["train", "--config", str(cfg), "--out", str(tmp_path / "bundle"), "--no-progress"]
    for override, message in (("layers=[99]", "outside 1..5"), ("kind=weird", "unknown head kind 'weird'"),
                              ("kind=norm_lm", "no trainable parameters"), ("head_options={colour=1}", "bad options"),
                              ("teacher=psychic", "teacher must be"), ("device=tpu", "unknown device"),
                              ("kind=lm_head head_options={}", "must train over the whole vocabulary")):
        work = tmp_path / f"w-{override.split('=')[0]}"
        assert main([*common, "--work", str(work), *override.split()]) == 2, override
        assert message in capsys.readouterr().err, override
        assert not work.exists(), override  # refused before generating a single answer
    work = tmp_path / "w"
    assert main([*common, "--work", str(work), "max_steps=1"]) == 0
    before = (work / "checkpoint" / "state.json").read_text()
    assert main([*common, "--work", str(work), "max_steps=1"]) == 2
    assert "--resume" in capsys.readouterr().err and (work / "checkpoint" / "state.json").read_text() == before
    assert main([*common, "--work", str(work), "--restart", "max_steps=1"]) == 0


def test_one_command_sweeps_a_setting_and_compares_the_runs(tmp_path):
    from exitspec.cli import main

    cfg = _cli_setup(tmp_path)
    out = tmp_path / "sweep"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--work", str(tmp_path / "w"), "--no-progress",
                 "--sweep", "temperature=1,2", "--eval-per-set", "1", "gen_max_new_tokens=4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep-eval", "temperature-1", "temperature-2"]
    assert (tmp_path / "w" / "distill.jsonl").is_file()  # the answers were generated once, for both runs
    assert not (tmp_path / "w" / "temperature-1" / "distill.jsonl").exists()
    with open(out / "sweep-eval" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["bundle"] for r in rows} == {"temperature-1", "temperature-2", "norm_lm", "full"}
    by = {(r["bundle"], r["layer"]): r for r in rows}
    assert float(by[("temperature-2", "2")]["train_temperature"]) == 2.0
    assert (out / "sweep-eval" / "layer_sweep.png").is_file()
    assert main(["train", "--config", str(cfg), "--out", str(out), "--sweep", "model=a,b"]) == 2


def test_heads_train_on_a_bf16_model(tmp_path):
    """The dtype a GPU runs by default, on the CPU: bf16 teacher states into fp32 heads."""
    from conftest import tiny_model
    from exitspec.loading import LoadedModel

    m = LoadedModel.from_hf(tiny_model("llama").to(torch.bfloat16), tiny_loaded("llama").tokenizer)
    result = Trainer(m, _cfg(epochs=4, lr=1e-2), random_examples(16), tmp_path, progress=False).train()
    first, last = result.history[0]["kd"], result.history[-1]["kd"]
    assert all(last[k] < first[k] for k in first), (first, last)
    assert all(p.dtype == torch.float32 for p in result.bundle.heads.parameters())


def test_accelerate_launch_with_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    cfg = _cli_setup(tmp_path)
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    # `--multi_gpu` is accelerate's torchrun launcher; without a GPU each process runs MULTI_CPU (gloo).
    # (`--cpu` alone would start a single process.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "exitspec.cli", "train", "--config", str(cfg), "--out", str(tmp_path / "bundle"),
           "--work", str(tmp_path / "w"), "--no-progress", "save_dtype=float32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from exitspec.cli import main
    from exitspec.loading import load

    lm = load(str(tmp_path / "model")).lm
    bundle = HeadBundle.load(tmp_path / "bundle", lm)
    # 16 train sequences over 2 processes of batch 4: 2 micro-batches per epoch, 2 epochs
    assert bundle.config.training["steps"] == 4
    assert "saved 2 swiglu heads" in proc.stdout
    # One process with the same global batch (8) trains the same heads: same batches, same token-mean loss.
    (tmp_path / "w1").mkdir()
    shutil.copy(tmp_path / "w" / "distill.jsonl", tmp_path / "w1" / "distill.jsonl")  # the same answers
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "one"), "--work", str(tmp_path / "w1"),
                 "--no-progress", "save_dtype=float32", "batch_size=8"]) == 0
    one = HeadBundle.load(tmp_path / "one", lm)
    assert one.config.training["steps"] == 4
    for k, v in one.state_dict().items():
        torch.testing.assert_close(bundle.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)

