"""K-quant GGUF blocks beyond Gemma 3's projections (models/kquants.py): an LM head stored in K-quant
blocks runs on the K-quant kernel (and a reduced draft vocabulary drafts from its own rows' blocks),
and a Llama-family K-quant file, whose q / k rows llama.cpp stores permuted, runs from its blocks.

Tiny models written to GGUF files with the block writers of tests/test_kquants.py; "lossless" is the
int4 runtime's own vanilla greedy output, token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import VOCAB, char_tokenizer
from exitspec import loading
from exitspec.decoding.draft_vocab import DraftHead
from exitspec.decoding.draft_work import draft_work
from exitspec.heads.bundle import HeadBundle
from exitspec.loading import LoadedModel
from exitspec.models.kquants import QuantLinear, kquant_table
from helpers_strategies import PROMPTS, greedy
from test_gemma3 import tiny_gemma3
from test_kquants import GEMMA, kind_of, quantize, write_projections

Q = GGMLQuantizationType
HALF = list(range(0, VOCAB, 2))  # a 48-token draft vocabulary: three whole 16-row tiles


def llama_kind(layer: int, proj: str) -> Q:
    """A Llama Q4_K_M-like mix (Q4_K mostly, Q6_K for v / down), with Q5_0 and Q8_0 in odd layers."""
    return {"q_proj": Q.Q4_K, "k_proj": Q.Q4_K, "v_proj": Q.Q6_K, "o_proj": (Q.Q4_K, Q.Q8_0)[layer % 2],
            "gate_proj": Q.Q4_K, "up_proj": (Q.Q4_K, Q.Q5_0)[layer % 2], "down_proj": Q.Q6_K}[proj]


def llama_cpp_order(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's permutation of q / k rows as its converter writes them: stored row r is HF row order[r]."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def write_gguf(path, model, arch: str, kinds, head: Q | None, permute: bool = False):
    """Quantise `model`'s projections (and with `head`, its tied LM head / embedding) to the given block
    types, put the de-quantised values back into the model and write the blocks to `path`, q / k rows in
    llama.cpp's order where `permute`."""
    c = model.config

    def stored(proj: str, raw: np.ndarray) -> np.ndarray:
        if permute and proj in ("q_proj", "k_proj"):
            heads = c.num_attention_heads if proj == "q_proj" else c.num_key_value_heads
            return raw[llama_cpp_order(raw.shape[0], heads)]
        return raw

    w = GGUFWriter(str(path), arch)
    write_projections(w, model, kinds, stored)
    with torch.no_grad():
        if head is not None:  # tied: llama.cpp writes the head as the embedding, token_embd
            weight = model.get_output_embeddings().weight
            if head == Q.F16:
                half = weight.numpy().astype(np.float16)
                weight.copy_(torch.from_numpy(half.astype(np.float32)))
                w.add_tensor("token_embd.weight", half)
            else:
                raw = quantize(weight.numpy(), head)
                weight.copy_(torch.from_numpy(quants.dequantize(raw, head).reshape(weight.shape)))
                w.add_tensor("token_embd.weight", raw, raw_dtype=head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def tiny_llama() -> LlamaForCausalLM:
    """A random Llama whose every input size is whole 256-value super-blocks (Q4_K, Q6_K)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.05, eos_token_id=None, bos_token_id=None,
                      pad_token_id=None)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def runtime(model, table, name: str) -> LoadedModel:
    m = LoadedModel.from_hf(model, char_tokenizer(), name=name)
    m.int4 = table
    return m


def close_to_hf(m: LoadedModel) -> float:
    ids = (torch.arange(20)[None] * 7 + 3) % 95
    lm = m.lm
    with torch.inference_mode():
        ref = m.model(ids).logits
        ours = lm.forward(ids, torch.arange(20)[None], lm.new_cache(1, 20))
    return float((ours - ref).norm() / ref.norm())


def check_reduced_vocab_drafts_from_the_head_blocks(m: LoadedModel, exit_layer: int) -> None:
    """Self-spec drafting over half the vocabulary stays lossless, and its draft head is the LM head's
    own blocks for those rows: the same logits as the full head's on them, half its bytes."""
    ref = greedy(m, PROMPTS, n=20).token_ids
    full = greedy(m, PROMPTS, n=20, strategy="self-spec", exit_layer=exit_layer, draft_len=3)
    half = greedy(m, PROMPTS, n=20, strategy="self-spec", exit_layer=exit_layer, draft_len=3, draft_vocab=HALF)
    assert full.token_ids == ref and half.token_ids == ref and half.stats.drafted > 0
    head = HeadBundle.create(m.lm, [exit_layer]).head(exit_layer)
    sub = DraftHead(head, torch.tensor(HALF))
    assert isinstance(sub.proj.proj, QuantLinear) and sub.proj.proj.types == m.lm._head.types
    h = torch.randn(3, m.lm.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(sub.logits(h), DraftHead(head).logits(h)[:, HALF])
    work_full, work_half = draft_work(DraftHead(head)), draft_work(sub)
    assert work_full.lm_head_bytes == m.lm.head_weight_bytes == 2 * work_half.lm_head_bytes
    assert (work_full.vocab, work_half.vocab, work_half.lm_head_flops) == (VOCAB, 48, 2 * 48 * m.lm.hidden_size)
    assert work_full.layer_bytes == work_half.layer_bytes == m.lm.layer_weight_bytes(0, exit_layer) > 0


@pytest.mark.filterwarnings("ignore::exitspec.decoding.api.NoHeadsWarning")  # untrained logit-lens drafts: fine here
def test_a_k_quant_lm_head_runs_on_the_k_quant_kernel(kernel_isa, tmp_path):
    """Gemma 3 whose tied head is Q6_K (llama.cpp's Q4_K_M head where the hidden size is whole super-blocks)."""
    path = tmp_path / "gemma-q6k-head.gguf"
    model = write_gguf(path, tiny_gemma3(**GEMMA), "gemma3", kind_of, head=Q.Q6_K)
    table = kquant_table(model, path)
    head = model.get_output_embeddings()
    assert table[head].kind == "Q6_K" and table[head].raw.shape == (VOCAB, 210)
    m = runtime(model, table, "tiny-gemma3-q6k-head")
    lm = m.lm
    assert isinstance(lm._head, QuantLinear) and lm.head_blocks is table[head]
    assert f"LM head: exitspec K-quant kernel (Q6_K), {kernel_isa} build" in lm.backend
    # The layers' line names each block type and the projections stored in it (kind_of's mix); a
    # Gemma 3 of K-quant blocks runs on the fused stack (kernels/csrc/gemma.cpp).
    assert "layers: exitspec fused C++ stack (K-quant blocks: Q5_0 (" in lm.backend
    for part in ("Q4_K (", "o, down", "Q6_K (", "Q8_0 (", "Q4_0 ("):
        assert part in lm.backend, part
    assert close_to_hf(m) < 0.03  # only the products' inputs are rounded (bf16, or int8 per group of 32)
    check_reduced_vocab_drafts_from_the_head_blocks(m, exit_layer=2)


def test_a_head_the_kernels_do_not_read_is_named_as_a_bf16_copy(kernel_isa, tmp_path):
    """A head stored as F16 is no block type the kernels read: the runtime says it runs a bf16 copy."""
    path = tmp_path / "gemma-f16-head.gguf"
    model = write_gguf(path, tiny_gemma3(**GEMMA), "gemma3", kind_of, head=Q.F16)
    table = kquant_table(model, path)
    assert model.get_output_embeddings() not in table
    lm = runtime(model, table, "tiny-gemma3-dense-head").lm
    assert lm.head_blocks is None
    assert "LM head: prepacked bf16 copy of the de-quantised weights (no Q8_0 / K-quant head" in lm.backend


@pytest.mark.filterwarnings("ignore::exitspec.decoding.api.NoHeadsWarning")
def test_a_llama_k_quant_gguf_runs_from_its_blocks_with_q_k_rows_in_hf_order(kernel_isa, tmp_path):
    path = tmp_path / "llama-q4km.gguf"
    model = write_gguf(path, tiny_llama(), "llama", llama_kind, head=Q.Q6_K, permute=True)
    # What exitspec.load(..., weights="int4") calls once the 4-bit groups are not found.
    table = loading._gguf_blocks(model, str(path), ValueError("not 4-bit groups"))
    m = runtime(model, table, "tiny-llama-q4km")
    lm = m.lm
    plan = lm.adapter._plans[1]
    assert not lm.adapter.fused  # the fused stack takes Q4_0 / Q4_1 groups only
    assert (plan.qkv.types, plan.o.types, plan.gate_up.types) == (("Q4_K", "Q4_K", "Q6_K"), ("Q8_0",), ("Q4_K", "Q5_0"))
    assert "K-quant kernels per projection: Q4_K (" in lm.backend
    assert "LM head: exitspec K-quant kernel (Q6_K)" in lm.backend
    assert close_to_hf(m) < 0.03
    check_reduced_vocab_drafts_from_the_head_blocks(m, exit_layer=2)


def test_llama_q_k_rows_as_stored_do_not_pass_for_hf_rows(kernel_isa, tmp_path):
    """The row order matters and the check sees it: a "llama" file with q / k rows in HF's order (not
    llama.cpp's) is refused by name rather than run with its heads' rotary pairs mixed up."""
    path = tmp_path / "llama-unpermuted.gguf"
    model = write_gguf(path, tiny_llama(), "llama", llama_kind, head=None, permute=False)
    with pytest.raises(ValueError, match=r"blk.0.attn_q.weight's Q4_K blocks do not reproduce "
                                         r"model.layers.0.self_attn.q_proj's weights bit for bit"):
        kquant_table(model, path)
