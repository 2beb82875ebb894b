"""Shared fixtures: tiny random models of each supported family, built in memory (no network)."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from exitspec.kernels import build as kernel_build

torch.set_num_threads(2)

# The instruction sets whose exitspec kernels this CPU runs: an AVX-512 machine tests its AVX2 build too.
KERNEL_ISAS = kernel_build.supported_isas()

# Kernel builds the current test asked for, and passed tests per build (reported at the end; with
# EXITSPEC_REQUIRE_KERNEL_BUILDS=1, as .ci/run sets, a build this CPU runs that no passed test
# exercised fails the run: a green suite must say something about every build the machine can load).
_test_isas: set[str] = set()
_passed_by_isa: dict[str, int] = {}


def exercise(isa: str) -> None:
    """Record that the running test uses the kernels built for `isa`."""
    _test_isas.add(isa)


def use_kernels(monkeypatch, isa: str | None) -> None:
    """Make the runtime pick the kernels built for `isa` (None: no kernels, torch's int4 fallback)."""
    if isa is None:
        monkeypatch.setitem(kernel_build._state, "", (None, "switched off by the test"))
        return
    monkeypatch.setenv("EXITSPEC_KERNELS", isa)
    monkeypatch.delitem(kernel_build._state, "", raising=False)  # chosen again; built modules stay cached
    assert kernel_build.load() is not None, kernel_build.unavailable_reason()
    exercise(isa)


def pytest_runtest_logstart(nodeid, location):
    _test_isas.clear()


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        for isa in _test_isas:
            _passed_by_isa[isa] = _passed_by_isa.get(isa, 0) + 1


def _unexercised() -> list[str]:
    return [isa for isa in KERNEL_ISAS if not _passed_by_isa.get(isa)]


def pytest_terminal_summary(terminalreporter):
    runs = ", ".join(f"{isa} ({_passed_by_isa.get(isa, 0)} passed tests)" for isa in KERNEL_ISAS) or "none"
    terminalreporter.write_line(f"exitspec kernel builds this CPU runs: {runs}; "
                                f"not runnable here: {_not_runnable() or 'none'}")
    if _unexercised():
        fails = " (EXITSPEC_REQUIRE_KERNEL_BUILDS is set: the run fails)" if _required() else ""
        terminalreporter.write_line(f"exitspec kernel builds no passed test exercised: {', '.join(_unexercised())}"
                                    + fails)


def _not_runnable() -> str:
    return "; ".join(f"{isa.name} ({kernel_build._why_not(isa)})" for isa in kernel_build.ISAS
                     if isa.name not in KERNEL_ISAS)


def _required() -> bool:
    return os.environ.get("EXITSPEC_REQUIRE_KERNEL_BUILDS", "") not in ("", "0")


def pytest_sessionfinish(session, exitstatus):
    if _required() and exitstatus == 0 and _unexercised():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(params=KERNEL_ISAS or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no exitspec kernels for this CPU: {kernel_build.chosen_isa()[1]}"))])
def kernel_isa(request, monkeypatch) -> str:
    """Each instruction set whose kernels this CPU runs, made the runtime's choice for the test."""
    use_kernels(monkeypatch, request.param)
    return request.param

VOCAB = 96
EOS = 95


def tiny_model(family: str, *, layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model. initializer_range is raised so next-token distributions are peaked,
    as in a trained model: near-uniform random logits would make greedy argmax ties common."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    # No EOS in the model config: HF generate then never stops early, like our ignore_eos runs.
    # The character tokenizer still names EOS for the driver's stop tests.
    common.update(eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5,
                            use_parallel_residual=True, **common)
        model = GPTNeoXForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(cfg)
    elif family == "gemma3":
        # Every third layer global, the others windowed (8 positions: shorter than most test runs).
        types = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(layers)]
        cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               query_pre_attn_scalar=16, max_position_embeddings=512, sliding_window=8,
                               layer_types=types, tie_word_embeddings=True, **common)
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval().requires_grad_(False)


FAMILIES = ["llama", "qwen2", "gpt_neox", "gpt2", "gemma3"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def char_tokenizer():
    """A character-level tokenizer over printable ASCII (ids 0..94) plus <eos> = 95, in memory."""
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<eos>"] = EOS
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def save_tiny_model(folder, family: str = "llama", *, layers: int = 6, seed: int = 0,
                    chat_template: str | None = None):
    """A tiny random model + the character tokenizer written as an HF folder, loadable by `--model`."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(family, layers=layers, seed=seed).save_pretrained(folder)
    tok = char_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


def tiny_loaded(family: str = "llama", **kw):
    """A LoadedModel over a tiny random model and the character tokenizer."""
    from exitspec.loading import LoadedModel

    return LoadedModel.from_hf(tiny_model(family, **kw), char_tokenizer(), name=f"tiny-{family}")


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from exitspec.loading import load

    return load("default")
