"""A reduced draft vocabulary (FR-Spec, decoding/draft_vocab.py) on Gemma 3, and the count of what a
drafted token reads and computes (decoding/draft_work.py), on tiny random Gemma 3 models.

Gemma 3's 262k-token LM head is where a reduced draft vocabulary matters most (figures:
benchmarks/gemma3-fr-spec/); here the mechanics: self-spec drafting over a subset (an explicit id
list, or the N most frequent tokens) stays token-for-token equal to vanilla, with a logit-lens exit
and a trained-kind adapter, and the counts follow the subset's size. The K-quant head's quantised
subset: tests/test_kquant_heads.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB
from exitspec.decoding.draft_vocab import DraftHead, draft_vocabulary
from exitspec.decoding.draft_work import draft_work
from exitspec.heads.bundle import HeadBundle
from helpers_strategies import greedy
from test_gemma3 import LONG_PROMPTS, gemma_loaded

C = 64  # tiny_gemma3's hidden size


@pytest.mark.filterwarnings("ignore::exitspec.decoding.api.NoHeadsWarning")  # logit-lens drafts: fine here
def test_self_spec_with_a_reduced_draft_vocabulary_is_lossless_on_gemma3():
    m = gemma_loaded()
    ref = greedy(m, LONG_PROMPTS, n=30).token_ids
    for exit_layer, vocab in ((2, list(range(0, VOCAB, 3))), (4, 40)):
        out = greedy(m, LONG_PROMPTS, n=30, strategy="self-spec", exit_layer=exit_layer, draft_len=4,
                     draft_vocab=vocab)
        assert out.token_ids == ref and out.stats.drafted > 0, (exit_layer, vocab)
    # A trained kind (a SwiGLU adapter, perturbed so it is not the logit lens) drafting over a subset.
    m.heads = HeadBundle.create(m.lm, [3], "swiglu", base_model=m.name, width=16)
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = greedy(m, LONG_PROMPTS, n=30, strategy="self-spec", exit_layer=3, draft_len=3, draft_vocab=48)
    assert out.token_ids == ref and out.stats.drafted > 0
    # The subset's drafts are the full head's logits on those rows.
    vocab = draft_vocabulary(m, 48, m.heads)
    h = torch.randn(2, 5, C, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(DraftHead(m.heads.head(3), vocab).logits(h), m.heads.head(3)(h)[..., vocab])


def test_draft_work_counts_layers_adapter_and_the_head_rows_a_draft_reads():
    m = gemma_loaded()
    lm = m.lm
    head = HeadBundle.create(lm, [3], "swiglu", base_model=m.name, width=16).head(3)
    full = draft_work(DraftHead(head))
    sub = draft_work(DraftHead(head, draft_vocabulary(m, list(range(32)))))
    # Dense fp32 weights: 4 bytes a weight, 2 FLOPs a weight.
    layer_weights = sum(p.numel() for blk in lm.adapter.layers[:3] for p in blk.parameters() if p.dim() == 2)
    assert full.layer_bytes == sub.layer_bytes == 4 * layer_weights and full.layer_flops == 2 * layer_weights
    assert full.adapter_flops == 2 * 3 * C * 16 and full.adapter_bytes == 4 * (3 * C * 16 + C)  # + its norm
    assert (full.vocab, full.lm_head_bytes, full.lm_head_flops) == (VOCAB, 4 * VOCAB * C, 2 * VOCAB * C)
    assert (sub.vocab, sub.lm_head_bytes, sub.lm_head_flops) == (32, 4 * 32 * C, 2 * 32 * C)
    assert sub.total_bytes == full.total_bytes - 4 * (VOCAB - 32) * C
    assert 0 < sub.head_share < full.head_share < 1
    assert draft_work(DraftHead(HeadBundle.create(lm, [3]).head(3))).adapter_bytes == 0  # the logit lens
