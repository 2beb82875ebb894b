"""eval-heads: the evaluator matches a direct HF computation; the command writes its CSV and plot."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import save_tiny_model, tiny_loaded
from exitspec.calibration.evaluate import evaluate_heads
from exitspec.calibration.sequences import greedy_sequences, heldout_prompts
from exitspec.heads.bundle import HeadBundle
from exitspec.runtime.sequences import scored_sequence, teacher_forward
from helpers_calibration import write_prompt_file


def test_teacher_forward_matches_hf_hidden_states():
    m = tiny_loaded("qwen2")
    seq = scored_sequence(list(range(10, 30)), 5)
    full_logits, hidden = teacher_forward(m.lm, seq, [1, 3])
    ids = torch.tensor([seq.ids])
    out = m.model(ids, output_hidden_states=True)
    rows = slice(seq.start - 1, len(seq.ids) - 1)
    assert torch.allclose(full_logits, out.logits[0, rows], atol=1e-4)
    for layer in (1, 3):  # HF hidden_states[l] = residual stream after l layers (pre final norm)
        assert torch.allclose(hidden[layer], out.hidden_states[layer][0, rows], atol=1e-4)


def test_evaluate_heads_matches_direct_computation():
    m = tiny_loaded("llama")
    bundle = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    seqs = [scored_sequence(list(range(20, 44)), 8), scored_sequence(list(range(50, 62)), 3)]
    rows = evaluate_heads(m, bundle, seqs)
    assert [(r["bundle"], r["layer"]) for r in rows] == [("heads", 2), ("heads", 4), ("full", 6)]
    # Reference: HF forward with hidden states; norm_lm = final norm + LM head on hidden_states[l].
    kl, agree, ce, n = {2: 0.0, 4: 0.0}, {2: 0, 4: 0}, {2: 0.0, 4: 0.0}, 0
    for s in seqs:
        out = m.model(torch.tensor([s.ids]), output_hidden_states=True)
        rows_ = slice(s.start - 1, len(s.ids) - 1)
        labels = torch.tensor(s.ids[s.start:])
        pf = torch.log_softmax(out.logits[0, rows_], -1)
        n += labels.numel()
        for layer in (2, 4):
            pe = torch.log_softmax(m.model.lm_head(m.model.model.norm(out.hidden_states[layer][0, rows_])), -1)
            kl[layer] += float((pf.exp() * (pf - pe)).sum())
            agree[layer] += int((pe.argmax(-1) == pf.argmax(-1)).sum())
            ce[layer] += float(-pe[torch.arange(labels.numel()), labels].sum())
    for r in rows[:2]:
        assert r["n_tokens"] == n
        assert r["kl"] == pytest.approx(kl[r["layer"]] / n, rel=1e-4)
        assert r["agreement"] == pytest.approx(agree[r["layer"]] / n)
        assert r["ce"] == pytest.approx(ce[r["layer"]] / n, rel=1e-4)
        assert r["coverage"] is None  # not calibrated
    assert rows[2]["kl"] == 0.0 and rows[2]["agreement"] == 1.0


def test_calibrate_then_eval_heads_commands(tmp_path):
    from exitspec.cli import main

    model_dir = save_tiny_model(tmp_path / "tiny")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl", 20)
    common = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "12", "--threads", "1"]
    cal = tmp_path / "cal"
    assert main(["calibrate", "--heads", "norm_lm:2,4", "--target", "0.5", "--score", "max_prob",
                 "--out", str(cal), *common]) == 0
    cfg = json.loads((cal / "bundle.json").read_text())
    assert set(cfg["thresholds"]) == {"2", "4"} and cfg["thresholds"]["4"]["score"] == "max_prob"
    out = tmp_path / "eval"
    seq_file = tmp_path / "eval-seqs.json"
    assert main(["eval-heads", "--heads", str(cal), "--out", str(out), "--save-sequences", str(seq_file), *common]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # Re-running on the saved sequences reproduces the results exactly (no regeneration needed).
    again = tmp_path / "again"
    assert main(["eval-heads", "--heads", str(cal), "--out", str(again), "--sequences", str(seq_file), *common]) == 0
    assert (again / "results.csv").read_text() == (out / "results.csv").read_text()
    assert [r["layer"] for r in rows] == ["2", "4", "6"]
    assert all(r["coverage"] != "" for r in rows)  # calibrated: coverage at the stored threshold
    png = (out / "layer_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # A learned gate over the hidden state alone, from the command line to a decoder that uses it.
    learned = tmp_path / "learned"
    assert main(["calibrate", "--heads", "norm_lm:2,4", "--target", "0.5", "--score", "learned",
                 "--estimator-inputs", "hidden", "--out", str(learned), *common]) == 0
    cfg = json.loads((learned / "bundle.json").read_text())
    assert {cfg["thresholds"][k]["score"] for k in ("2", "4")} == {"learned"}
    assert {cfg["estimators"][k]["inputs"] for k in ("2", "4")} == {"hidden"}
    assert main(["generate", "hello", "--model", str(model_dir), "--heads", str(learned), "--strategy", "cascade",
                 "--max-new-tokens", "6", "--raw"]) == 0


def test_many_checkpoints_in_one_run_and_plain_text(tmp_path, capsys):
    """`--heads 'runs/*/'` compares every bundle a pattern matches on the same tokens; `--text-file`
    scores plain text; rows carry top-5 rates and the KL at the training temperature."""
    from exitspec.cli import main
    from exitspec.loading import load

    model_dir = save_tiny_model(tmp_path / "tiny")
    lm = load(str(model_dir)).lm
    for name, layers in (("a", [2]), ("b", [2, 4])):
        bundle = HeadBundle.create(lm, layers, "linear", base_model="tiny")
        bundle.config.training = {"config": {"temperature": 2.0}}
        bundle.save(tmp_path / "runs" / name)
    text = tmp_path / "ood.txt"
    text.write_text("\n\n".join(f"A paragraph about topic {i}, written plainly for testing." for i in range(5)))
    out = tmp_path / "eval"
    assert main(["eval-heads", "--model", str(model_dir), "--heads", str(tmp_path / "runs" / "*"),
                 "--text-file", str(text), "--num-prompts", "4", "--max-new-tokens", "30", "--threads", "1",
                 "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["bundle"], r["layer"]) for r in rows] == [("a", "2"), ("b", "2"), ("b", "4"), ("full", "6")]
    a2, b2 = rows[0], rows[1]
    assert a2["n_tokens"] == b2["n_tokens"] and a2["kl"] == b2["kl"]  # untrained linear heads: the same exit
    assert float(a2["train_temperature"]) == 2.0 and float(a2["kl_at_train_temperature"]) != float(a2["kl"])
    assert float(a2["top5_agreement"]) >= float(a2["agreement"]) and float(a2["top5_accuracy"]) >= float(a2["accuracy"])
    meta = json.loads((out / "results.json").read_text())
    assert meta["data"]["text"] == "plain" and meta["data"]["n_sequences"] == 4 and set(meta["bundles"]) == {"a", "b"}
    assert main(["eval-heads", "--model", str(model_dir), "--heads", str(tmp_path / "none" / "*"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no head bundle" in capsys.readouterr().err


def test_command_errors(tmp_path, capsys):
    from exitspec.cli import main

    model_dir = save_tiny_model(tmp_path / "tiny")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl", 20)
    common = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "4", "--threads", "1"]
    assert main(["eval-heads", "--heads", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["calibrate", "--heads", "norm_lm:2", "--target", "1.5", "--out", str(tmp_path / "c"), *common]) == 2
    assert "target agreement must be in (0, 1]" in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text('"a single prompt"\n')
    assert main(["eval-heads", "--heads", "norm_lm:2", "--out", str(tmp_path / "c"), "--model", str(model_dir),
                 "--prompts", str(one)]) == 2
    assert "no held-out prompts" in capsys.readouterr().err
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_text("precious")
    assert main(["calibrate", "--heads", "norm_lm:2", "--out", str(src), *common]) == 2
    assert "is not a head bundle" in capsys.readouterr().err
    assert (src / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_norm_lm_on_default_model(default_model):
    """The logit lens on SmolLM2: shallow exits disagree with the full model, deep ones much less."""
    bundle = HeadBundle.create(default_model.lm, [4, 24], "norm_lm")
    seqs = greedy_sequences(default_model, heldout_prompts("eval", 2), max_new_tokens=24)
    rows = {r["layer"]: r for r in evaluate_heads(default_model, bundle, seqs)}
    assert rows[4]["kl"] > 5.0 and rows[4]["agreement"] < 0.3
    assert rows[24]["agreement"] > rows[4]["agreement"] + 0.1
    assert rows[24]["kl"] < rows[4]["kl"]
    assert rows[30]["accuracy"] > 0.95  # labels are the full model's own greedy tokens
