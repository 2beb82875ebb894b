"""Sliding-window attention (Mistral; Qwen2's windowed layers) as HF computes it, on sequences longer
than the window: the dense per-layer path, the fused C++ stack, vanilla decoding and the lossless
strategies.

The defect this guards: with transformers 5 Mistral's attention module has no `sliding_window`
attribute (every layer reads config.sliding_window at run time), and exitspec read only the
attribute, so Mistral ran with full attention and silently departed from HF past the window.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import exitspec
from conftest import char_tokenizer
from exitspec.loading import LoadedModel
from exitspec.models.int4 import int4_table
from exitspec.runtime.layered import LayeredModel
from helpers_strategies import greedy
from test_int4 import q4_1
from test_kernels import assert_fused_close

WINDOW = 4
SEQ = 20  # > WINDOW: most queries see only part of their context
IDS = (torch.arange(SEQ)[None] * 7 + 3) % 95
POS = torch.arange(SEQ)[None]
PROMPT = "a prompt much longer than the window"


def windowed(family: str, window: int | None = WINDOW, *, q4: bool = False) -> torch.nn.Module:
    """A tiny random model whose attention is windowed (Mistral: every layer; Qwen2: layers >= 1)."""
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=window, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=window is not None, sliding_window=window,
                                             max_window_layers=1, **common))
    model = model.eval().requires_grad_(False)
    if q4:
        head = model.get_output_embeddings()
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear) and mod is not head:
                    mod.weight.copy_(q4_1(mod.weight))
    return model


def full_attention_twin(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """The same weights with no window: what exitspec computed for Mistral before the fix."""
    twin = windowed(family, None)
    twin.load_state_dict(model.state_dict())
    return twin


def hf_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


def runtime_logits(lm: LayeredModel) -> torch.Tensor:
    with torch.inference_mode():
        return lm.forward(IDS, POS, lm.new_cache(1, SEQ))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_dense_runtime_matches_hf_past_the_window(family):
    model = windowed(family)
    lm = LayeredModel(model)
    assert [lm.adapter.window(i) for i in range(3)] == ([WINDOW] * 3 if family == "mistral" else [None, WINDOW, WINDOW])
    ref, ours = hf_logits(model), runtime_logits(lm)
    assert float((ours - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    # The window matters on this sequence: full attention gives clearly different logits past it.
    full = hf_logits(full_attention_twin(model, family))
    assert float((full[0, WINDOW:] - ref[0, WINDOW:]).abs().max()) > 0.05 * float(ref.abs().max())
    # ...and none before it, where every query's context fits in the window.
    assert torch.allclose(full[0, :WINDOW], ref[0, :WINDOW], atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_fused_stack_keeps_the_window(kernel_isa, family):
    """The fused stack against the per-layer path over the same q4 weights, and both near HF's own
    forward on those weights (the products' input rounding is the only difference)."""
    model = windowed(family, q4=True)
    fused = LayeredModel(model, int4=int4_table(model))
    per_layer = LayeredModel(model, int4=int4_table(model), fuse=False)
    assert fused.adapter.fused and not per_layer.adapter.fused
    assert_fused_close(fused, per_layer, IDS, POS, kernel_isa)
    ref, ours = hf_logits(model), runtime_logits(fused)
    full = hf_logits(full_attention_twin(model, family))

    def rel(x, y):
        return float((x - y).norm() / y.norm())

    assert rel(ours, ref) < 0.5 * rel(full, ref)  # nearer HF's windowed model than a full-attention one


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_vanilla_greedy_equals_hf_generate_past_the_window(family):
    model = windowed(family)
    m = LoadedModel.from_hf(model, char_tokenizer(), name=f"tiny-{family}-window")
    ids = m.tokenizer(PROMPT)["input_ids"]
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False, pad_token_id=95)
    r = exitspec.generate(m, PROMPT, chat=False, max_new_tokens=30, ignore_eos=True)
    assert r.token_ids[0] == out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_lossless_strategies_stay_lossless_past_the_window(family):
    m = LoadedModel.from_hf(windowed(family), char_tokenizer(), name=f"tiny-{family}-window")
    prompts = [PROMPT, "short", "another prompt, longer than four"]
    ref = greedy(m, prompts, n=30).token_ids
    assert greedy(m, prompts, n=30, strategy="self-spec", exit_layer=1, draft_len=3).token_ids == ref
    assert greedy(m, prompts, n=30, strategy="lookup", draft_len=4).token_ids == ref
