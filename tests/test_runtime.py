"""Parity of the layered runtime with HF's own forward, for every supported family."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_model
from exitspec.models.adapters import UnsupportedArchitectureError
from exitspec.models.dims import ModelDims
from exitspec.runtime.kv_cache import CacheFullError
from exitspec.runtime.layered import LayeredModel

ATOL = 2e-5


def _positions(B, start, T):
    return (torch.arange(T) + start).expand(B, T).contiguous()


def test_one_set_of_dimensions_read_from_each_family(family):
    lm = LayeredModel(tiny_model(family))
    # every tiny family: 6 layers, C = 64, 4 query heads; GQA (2 KV heads) where the family has it
    kv = 2 if family in ("llama", "qwen2", "gemma3") else 4
    assert lm.dims == ModelDims(num_layers=6, hidden_size=64, vocab_size=VOCAB, num_heads=4, num_kv_heads=kv,
                                head_dim=16, max_positions=512)
    assert lm.adapter.dims is lm.dims
    assert (lm.num_layers, lm.hidden_size, lm.vocab_size, lm.max_positions) == (6, 64, VOCAB, 512)


def test_full_forward_matches_hf(family):
    model = tiny_model(family)
    lm = LayeredModel(model)
    ids = torch.randint(0, VOCAB, (2, 24))
    ref = model(ids).logits
    out = lm.forward(ids, _positions(2, 0, 24), lm.new_cache(2, 32))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_incremental_decoding_matches_full_forward(family):
    model = tiny_model(family)
    lm = LayeredModel(model)
    ids = torch.randint(0, VOCAB, (2, 20))
    ref = model(ids).logits
    cache = lm.new_cache(2, 32)
    outs = [lm.forward(ids[:, :9], _positions(2, 0, 9), cache)]
    t = 9
    for k in (1, 3, 2, 1, 4):  # mixed step sizes, like drafting + verification
        outs.append(lm.forward(ids[:, t:t + k], _positions(2, t, k), cache))
        t += k
    torch.testing.assert_close(torch.cat(outs, 1), ref[:, :t], atol=ATOL, rtol=0)
    assert cache.lengths.eq(t).all()


def test_rollback_then_redecode_equals_never_drafting(family):
    model = tiny_model(family)
    lm = LayeredModel(model)
    ids = torch.randint(0, VOCAB, (1, 16))
    junk = torch.randint(0, VOCAB, (1, 5))
    clean = lm.new_cache(1, 32)
    lm.forward(ids[:, :10], _positions(1, 0, 10), clean)
    ref = lm.forward(ids[:, 10:], _positions(1, 10, 6), clean)

    cache = lm.new_cache(1, 32)
    lm.forward(ids[:, :10], _positions(1, 0, 10), cache)
    lm.forward(junk, _positions(1, 10, 5), cache)  # a rejected draft
    cache.rollback(10)
    assert cache.lengths.eq(10).all()
    out = lm.forward(ids[:, 10:], _positions(1, 10, 6), cache)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_partial_layers_then_resume_equals_full(family):
    """Run layers 0..l now and l..L later on the same positions (what self-speculation does)."""
    model = tiny_model(family)
    lm = LayeredModel(model)
    ids = torch.randint(0, VOCAB, (1, 12))
    ref = model(ids).logits
    cache = lm.new_cache(1, 16, hidden_layer=3)
    pos = _positions(1, 0, 12)
    h = lm.run_layers(lm.embed(ids, pos), pos, cache, 0, 3)
    cache.keep_hidden(h, pos)
    assert cache.lengths[:3].eq(12).all() and cache.lengths[3:].eq(0).all()
    out = lm.logits(lm.run_layers(cache.hidden[:, :12], pos, cache, 3, lm.num_layers))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_ragged_batch_rows_match_single_rows(family):
    """Rows of different lengths at different positions in one batch, scattered cache writes."""
    model = tiny_model(family)
    lm = LayeredModel(model)
    a = torch.randint(0, VOCAB, (1, 11))
    b = torch.randint(0, VOCAB, (1, 7))
    refs = [model(x).logits[0, -1] for x in (a, b)]
    cache = lm.new_cache(2, 16)
    # Prefill both rows padded to 10 tokens; row b's pads sit at positions 6..9.
    pre = torch.cat([a[:, :10], torch.cat([b[:, :6], b[:, :4]], 1)])
    lm.forward(pre, _positions(2, 0, 10), cache)
    last = torch.tensor([[a[0, 10]], [b[0, 6]]])
    out = lm.forward(last, torch.tensor([[10], [6]]), cache)
    torch.testing.assert_close(out[0, -1], refs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, -1], refs[1], atol=ATOL, rtol=0)


def test_cache_overflow_is_a_clear_error():
    lm = LayeredModel(tiny_model("llama"))
    cache = lm.new_cache(1, 8)
    with pytest.raises(CacheFullError, match="raise max_len"):
        lm.forward(torch.zeros(1, 9, dtype=torch.long), _positions(1, 0, 9), cache)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(UnsupportedArchitectureError, match="llama, qwen2, mistral, gpt_neox, gpt2"):
        LayeredModel(model)
