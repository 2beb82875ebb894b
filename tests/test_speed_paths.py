"""The runtime's fast paths compute the reference math: fused projections, padded rows, aligned slots."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, tiny_model
from exitspec.models.ops import MIN_ROWS, attention, linear
from exitspec.runtime.kv_cache import SLOT_ALIGN
from exitspec.runtime.layered import LayeredModel


def test_fused_projections_leave_hf_forward_bit_identical(family):
    """Building the adapter re-points HF's q/k/v and gate/up weights at views of one fused buffer."""
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 12))
    before = model(ids).logits
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    LayeredModel(model)
    assert torch.equal(model(ids).logits, before)
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n
    if family in ("llama", "qwen2"):
        at = model.model.layers[0].self_attn
        assert at.q_proj.weight.untyped_storage().data_ptr() == at.v_proj.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_padded_linear_equals_f_linear(rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 32), torch.randn(48), torch.randn(1, rows, 32)
    torch.testing.assert_close(linear(x, w, b, MIN_ROWS), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert linear(x, w).shape == (1, rows, 48)


@pytest.mark.parametrize("T", [1, 2, MIN_ROWS, 6])
def test_padded_attention_equals_sdpa(T):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    mask = torch.rand(2, 1, T, 20) > 0.3
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, mask, 0.25, MIN_ROWS), ref, atol=1e-5, rtol=1e-5)


def test_cache_slots_are_aligned_and_masked_slots_are_ignored():
    lm = LayeredModel(tiny_model("llama"))
    cache = lm.new_cache(1, 21)
    assert cache.k.shape[3] % SLOT_ALIGN == 0 and cache.max_len == 21
    ids = torch.randint(0, VOCAB, (1, 21))
    ref = lm.forward(ids, torch.arange(21)[None], lm.new_cache(1, 21))
    cache.k.fill_(1e3)  # garbage in slots that causal masking must hide
    cache.v.fill_(-1e3)
    out = torch.cat([lm.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache) for t in range(21)], 1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_default_model_rows_are_bit_identical_in_1_and_k_row_calls(default_model):
    """What lossless speculative decoding relies on: verification over k rows computes exactly what
    vanilla decoding computes one row at a time (same kernels, same reduction order)."""
    from exitspec.decoding.api import encode_prompt
    from exitspec.runtime.profile import row_invariance

    lm = default_model.lm
    prompts = [encode_prompt(default_model.tokenizer, p) for p in ("Why do cats purr?", "List three fruits.")]
    lm.row_invariant = True
    try:
        for k in (3, 8):
            r = row_invariance(lm, prompts, k=k)
            assert r["max_abs_logit_diff"] == 0.0 and r["argmax_flips"] == 0, r
    finally:
        lm.row_invariant = False


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_step_costs_split_layers_into_attention_and_mlp_halves(family):
    """bench-runtime's step table: every part is timed, the halves add up to the layers (the MLP half
    is their difference, never negative) and k = 1 is the unit."""
    from exitspec.runtime.profile import step_costs

    lm = LayeredModel(tiny_model(family))
    rows = step_costs(lm, context=32, ks=(1, 4), repeats=3)
    assert [r["k"] for r in rows] == [1, 4] and rows[0]["vs_k1"] == 1.0
    for r in rows:
        assert min(r["step_ms"], r["layers_ms"], r["attention_ms"], r["head_ms"]) > 0 and r["mlp_ms"] >= 0
        assert r["mlp_ms"] == pytest.approx(max(0.0, r["layers_ms"] - r["attention_ms"]))
