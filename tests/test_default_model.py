"""The real embedded default model (SmolLM2-135M-Instruct): loading, parity with HF generate, CLI."""

from __future__ import annotations

import pytest
import torch

import exitspec
from exitspec.cli import main
from exitspec.decoding.api import encode_prompt
from exitspec.loading import ModelLoadError, load

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three uses of a paperclip.",
    "How do I reverse a list in Python?",
    "Why do cats purr?",
]


@pytest.mark.slow
def test_default_model_layout(default_model):
    lm = default_model.lm
    assert (lm.num_layers, lm.hidden_size, lm.vocab_size) == (30, 576, 49152)
    assert default_model.tokenizer.chat_template


@pytest.mark.slow
def test_vanilla_greedy_equals_hf_generate_on_chat_prompts(default_model):
    m = default_model
    for prompt in CHAT_PROMPTS:
        ids = encode_prompt(m.tokenizer, prompt)
        x = torch.tensor([ids])
        ref = m.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False)
        ref = ref[0, len(ids):].tolist()
        ours = exitspec.generate(m, prompt, max_new_tokens=48)
        assert ours.token_ids[0] == ref, prompt


@pytest.mark.slow
def test_cli_generate_streams_and_reports_speed(capsys):
    assert main(["generate", "Say hello.", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "tokens/s" in out.err


def test_missing_paths_get_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load("default", dtype="float8")


def test_cli_reports_bad_model_path_without_traceback(capsys, tmp_path):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_main_job_runs_every_recommended_strategy(capsys):
    # The README's first command ends in `exitspec demo`: int4 weights, the shipped heads, every
    # strategy the bundle recommends, each checked against vanilla token for token.
    assert main(["demo", "--max-new-tokens", "8", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "int4 weights" in out
    names = ("vanilla", "lookup", "self-spec", "dssd", "cascade", "mlp-skip")
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in names}
    assert sorted(rows) == ["cascade", "dssd", "lookup", "mlp-skip", "self-spec", "vanilla"]
    # The lossless strategies must reproduce vanilla on all three prompts.
    assert all("3/3 identical" in rows[s] for s in ("lookup", "self-spec", "dssd"))
