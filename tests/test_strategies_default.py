"""Lossless strategies on the real default model (SmolLM2-135M-Instruct): greedy == vanilla.

20 held-out chat prompts x 5 (exit layer, draft length) settings, batch 1 and batch 4, kept within the
time budget by short generations: each prompt runs one setting alone and one inside a batch of four.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

import exitspec
from exitspec.decoding.api import encode_prompt
from exitspec.heads.bundle import BundleError, HeadBundle
from exitspec.loading import attach_heads
from exitspec.prompts import mixed_prompts

N_NEW = 12
SETTINGS = [(6, 2), (10, 3), (15, 4), (20, 2), (24, 1)]  # (exit_layer, draft_len)


@pytest.fixture(scope="module")
def chat_ids(default_model):
    prompts = mixed_prompts("heldout", 4, max_chars=300)
    assert len(prompts) >= 20
    return [encode_prompt(default_model.tokenizer, p.text) for p in prompts[:20]]


@pytest.fixture(scope="module")
def vanilla_refs(default_model, chat_ids):
    """Vanilla greedy continuations, one prompt at a time (batch rows must match them too)."""
    return [_run(default_model, [ids]).token_ids[0] for ids in chat_ids]


def _run(m, ids, **kw):
    return exitspec.generate(m, None, prompt_ids=ids, max_new_tokens=N_NEW, ignore_eos=True, **kw)


def _check_self_spec(m, chat_ids, refs, settings):
    accepted = 0
    for i, ids in enumerate(chat_ids):  # batch 1, every setting on 4 prompts
        layer, gamma = settings[i % len(settings)]
        out = _run(m, [ids], strategy="self-spec", exit_layer=layer, draft_len=gamma)
        assert out.token_ids[0] == refs[i], (i, layer, gamma)
        accepted += out.stats.accepted
    for j in range(0, len(chat_ids), 4):  # ragged batches of 4, one setting each
        layer, gamma = settings[(j // 4 + 2) % len(settings)]
        out = _run(m, chat_ids[j:j + 4], strategy="self-spec", exit_layer=layer, draft_len=gamma)
        assert out.token_ids == refs[j:j + 4], (j, layer, gamma)
    return accepted


@contextmanager
def heads_swapped(m, bundle):
    """Run with `bundle` as the session-wide default model's heads, then put its own back."""
    saved, m.heads = m.heads, bundle
    try:
        yield
    finally:
        m.heads = saved


@pytest.mark.slow
def test_self_spec_greedy_equals_vanilla_norm_lm(default_model, chat_ids, vanilla_refs):
    m = default_model
    with heads_swapped(m, None):  # untrained norm_lm heads
        assert _check_self_spec(m, chat_ids, vanilla_refs, SETTINGS) > 0


@pytest.mark.slow
def test_dssd_greedy_equals_vanilla_norm_lm(default_model, chat_ids, vanilla_refs):
    m = default_model
    with heads_swapped(m, HeadBundle.create(m.lm, [8, 16, 24], "norm_lm")):
        out = _run(m, chat_ids[:4], strategy="dssd", exit_layers=[8, 16, 24], threshold=0.3, max_draft=6)
        assert out.token_ids == vanilla_refs[:4] and out.stats.drafted > 0


@pytest.mark.slow
def test_self_spec_greedy_equals_vanilla_trained_heads(default_model, chat_ids, vanilla_refs):
    m = default_model
    with heads_swapped(m, m.heads):
        try:
            bundle = attach_heads(m, "default")
        except BundleError:
            pytest.skip("no shipped head bundle in this build")
        layers = bundle.layers
        settings = [(layers[i % len(layers)], g) for i, g in enumerate((2, 4, 3, 5, 1))]
        assert _check_self_spec(m, chat_ids[:8], vanilla_refs[:8], settings) > 0


@pytest.mark.slow
def test_lookup_greedy_equals_vanilla(default_model, chat_ids, vanilla_refs):
    m, accepted = default_model, 0
    for i, ids in enumerate(chat_ids):  # batch 1, three draft lengths
        out = _run(m, [ids], strategy="lookup", draft_len=(2, 3, 5)[i % 3])
        assert out.token_ids[0] == vanilla_refs[i], i
        accepted += out.stats.accepted
    for j in range(0, len(chat_ids), 4):  # ragged batches of 4: rows with and without a match
        out = _run(m, chat_ids[j:j + 4], strategy="lookup", draft_len=3)
        assert out.token_ids == vanilla_refs[j:j + 4], j
    assert accepted > 0


@pytest.mark.slow
def test_self_spec_with_a_block_head_on_the_int4_runtime(default_model, chat_ids, vanilla_refs):
    """A block head (its own fp32 layer and keys / values beside the fused int4 stack) drafts for
    self-spec on the real model: lossless, and a copy of the last layer after exit L-1 reproduces the
    model's next token nearly always (its weights are the checkpoint's de-quantised ones)."""
    m = default_model
    L = m.lm.num_layers
    with heads_swapped(m, HeadBundle.create(m.lm, [L - 1], "block", init="copy")):
        out = _run(m, chat_ids[:4], strategy="self-spec", exit_layer=L - 1, draft_len=4)
    assert out.token_ids == vanilla_refs[:4]
    assert out.stats.accepted >= 0.8 * out.stats.drafted > 0
