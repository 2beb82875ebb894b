"""Gemma 3 (`gemma3_text`) in the runtime, on tiny random models built in memory: logits equal HF's
forward past the sliding window, vanilla greedy equals HF's greedy generate, the lossless strategies
stay lossless, and exit heads that are a Gemma layer (heads/block.py) start as the logit lens.

The tiny configs give the local and global layers RoPE bases far apart and random (non-zero) norm
weights, so a layer that used the other kind's table, a norm left out or applied as w instead of
1 + w, or a missing window would move the logits well past the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import exitspec
from conftest import VOCAB, char_tokenizer
from exitspec.heads.bundle import HeadBundle
from exitspec.heads.kinds import make_head
from exitspec.loading import LoadedModel
from exitspec.models.adapters import UnsupportedArchitectureError
from exitspec.models.int4 import int4_table
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.sequences import teacher_pass
from helpers_strategies import PROMPTS, greedy
from test_int4 import q4_1

WINDOW = 4
SEQ = 20  # > WINDOW: most queries of a sliding layer see only part of their context
IDS = (torch.arange(SEQ)[None] * 7 + 3) % 95
POS = torch.arange(SEQ)[None]
S, F = "sliding_attention", "full_attention"
LAYER_TYPES = [S, F, S, S, F, S]
LONG_PROMPTS = [*PROMPTS, "a prompt much longer than the window of four"]


def tiny_gemma3(*, seed: int = 0, window: int = WINDOW, layer_types=LAYER_TYPES, local_theta: float = 10.0,
                global_theta: float = 10_000.0, **overrides) -> Gemma3ForCausalLM:
    """A random fp32 Gemma 3 with a local / global layer mix; norm weights random (HF zero-inits them)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
              max_position_embeddings=256, initializer_range=0.2, sliding_window=window,
              layer_types=list(layer_types), tie_word_embeddings=True,
              rope_parameters={S: {"rope_type": "default", "rope_theta": local_theta},
                               F: {"rope_type": "default", "rope_theta": global_theta}},
              eos_token_id=None, bos_token_id=None, pad_token_id=None)
    kw.update(overrides)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def gemma_loaded(**kw) -> LoadedModel:
    return LoadedModel.from_hf(tiny_gemma3(**kw), char_tokenizer(), name="tiny-gemma3")


def hf_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


def runtime_logits(lm: LayeredModel, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return lm.forward(ids, torch.arange(ids.shape[1])[None], lm.new_cache(1, ids.shape[1]))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def test_layers_know_their_kind_window_and_rope_table():
    lm = LayeredModel(tiny_gemma3())
    a = lm.adapter
    assert a.family == "gemma3" and not a.fused
    assert [a.window(i) for i in range(6)] == [WINDOW if t == S else None for t in LAYER_TYPES]
    assert [a.rope_kinds[p.rope] for p in a._plans] == LAYER_TYPES
    cos, sin = a.rope(torch.zeros(2, 3, 64), torch.tensor([[0, 1, 2], [5, 6, 7]]))
    assert cos.shape == sin.shape == (2, 2, 3, 16)  # (kinds, B, T, D)
    assert not torch.allclose(cos[0], cos[1])  # two bases, two tables


def test_logits_match_hf_past_the_window():
    model = tiny_gemma3()
    ref, ours = hf_logits(model), runtime_logits(LayeredModel(model))
    assert rel_err(ours, ref) < 1e-5
    # What the test can tell apart: no window, or one RoPE base for both kinds, moves the logits far.
    for twin_kw in (dict(window=10_000), dict(local_theta=10_000.0)):
        twin = tiny_gemma3(**twin_kw)
        twin.load_state_dict(model.state_dict())
        assert rel_err(hf_logits(twin)[0, WINDOW:], ref[0, WINDOW:]) > 0.05


def test_logits_match_hf_one_token_at_a_time_and_in_chunks():
    """Prefill in pieces then single steps, positions scattered per row: the cache, the window masks
    and the per-position RoPE rows agree with one full forward."""
    model = tiny_gemma3()
    lm = LayeredModel(model)
    ref = hf_logits(model)
    cache = lm.new_cache(1, SEQ)
    got = []
    with torch.inference_mode():
        for a, b in [(0, 7), (7, 8), (8, 13), *((t, t + 1) for t in range(13, SEQ))]:
            got.append(lm.forward(IDS[:, a:b], POS[:, a:b], cache))
    assert rel_err(torch.cat(got, 1), ref) < 1e-5


def test_final_logit_softcapping_as_hf():
    model = tiny_gemma3(final_logit_softcapping=3.0)
    lm = LayeredModel(model)
    assert lm.adapter.logit_softcap == 3.0
    ref, ours = hf_logits(model), runtime_logits(lm)
    assert float(ref.abs().max()) < 3.0  # the cap binds
    assert rel_err(ours, ref) < 1e-5


def test_refused_settings_are_named():
    with pytest.raises(UnsupportedArchitectureError, match="attn_logit_softcapping"):
        LayeredModel(tiny_gemma3(attn_logit_softcapping=50.0))
    with pytest.raises(UnsupportedArchitectureError, match="use_bidirectional_attention"):
        LayeredModel(tiny_gemma3(use_bidirectional_attention=True))


def test_vanilla_greedy_equals_hf_generate():
    m = gemma_loaded()
    for prompt in ("a prompt much longer than the window", "x"):
        ids = m.tokenizer(prompt)["input_ids"]
        x = torch.tensor([ids])
        out = m.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False,
                               pad_token_id=95)
        r = exitspec.generate(m, prompt, chat=False, max_new_tokens=30, ignore_eos=True)
        assert r.token_ids[0] == out[0, len(ids):].tolist()


@pytest.mark.parametrize("row_invariant", [False, True])
def test_lossless_strategies_are_lossless(row_invariant):
    m = gemma_loaded()
    m.lm.row_invariant = row_invariant
    ref = greedy(m, LONG_PROMPTS, n=30).token_ids
    for exit_layer, draft_len in ((1, 3), (4, 5)):
        out = greedy(m, LONG_PROMPTS, n=30, strategy="self-spec", exit_layer=exit_layer, draft_len=draft_len)
        assert out.token_ids == ref
    assert greedy(m, LONG_PROMPTS, n=30, strategy="lookup", draft_len=4).token_ids == ref
    m.heads = HeadBundle.create(m.lm, [1, 3, 5], "norm_lm")
    for layer in (1, 3, 5):
        m.heads.config.thresholds[str(layer)] = {"score": "max_prob", "value": 0.3}
    out = greedy(m, LONG_PROMPTS, n=30, strategy="dssd", exit_layers=[1, 3, 5], max_draft=5)
    assert out.token_ids == ref and out.stats.drafted > 0


def test_block_heads_start_as_the_logit_lens_and_draft_losslessly():
    """heads/block.py runs a copy of a Gemma layer through adapter.block: untrained ("new") it is the
    identity, and a perturbed copy drafts for self-spec without changing a token."""
    m = gemma_loaded()
    ids = IDS[:, :13]
    for layer in (1, 2):  # a copy of a global layer (1) and of a sliding one (2)
        tp = teacher_pass(m.lm, ids, [layer, layer + 1])
        with torch.no_grad():
            new = make_head("block", m.lm, layer, init="new")(tp.hidden[layer])
            copy = make_head("block", m.lm, layer, init="copy")(tp.hidden[layer])
        torch.testing.assert_close(new, make_head("norm_lm", m.lm, layer)(tp.hidden[layer]), rtol=0, atol=1e-5)
        torch.testing.assert_close(copy, make_head("norm_lm", m.lm, layer + 1)(tp.hidden[layer + 1]),
                                   rtol=0, atol=1e-4)
    ref = greedy(m, LONG_PROMPTS, n=24).token_ids
    m.heads = HeadBundle.create(m.lm, [2], "block", base_model=m.name, init="copy")
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    out = greedy(m, LONG_PROMPTS, n=24, strategy="self-spec", exit_layer=2, draft_len=3)
    assert out.token_ids == ref and out.stats.accepted > 0


def test_int4_weights_run_per_projection_and_stay_lossless(kernel_isa):
    """Q4_1 projections (exact 4-bit groups) run on exitspec's q4 kernel one projection at a time (the
    fused Gemma stack takes K-quant blocks only, test_gemma_stack.py): near HF's forward on the same
    weights, and lossless."""
    model = tiny_gemma3()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod is not head:
                mod.weight.copy_(q4_1(mod.weight))
    m = LoadedModel.from_hf(model, char_tokenizer(), name="tiny-gemma3-q4")
    m.int4 = int4_table(model)
    lm = m.lm
    assert lm.weights == "int4" and not lm.adapter.fused and "q4 kernel per projection" in lm.backend
    ours, ref = runtime_logits(lm), hf_logits(model)
    assert float((ours - ref).norm() / ref.norm()) < 0.02  # the products' inputs rounded (bf16 / int8)
    ref_ids = greedy(m, LONG_PROMPTS, n=20).token_ids
    assert greedy(m, LONG_PROMPTS, n=20, strategy="self-spec", exit_layer=2, draft_len=3).token_ids == ref_ids
