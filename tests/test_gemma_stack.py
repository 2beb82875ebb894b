"""The fused Gemma 3 stack (kernels/csrc/gemma.cpp) over a K-quant GGUF's blocks, for every kernel
build this CPU runs, on a tiny Gemma 3 written to a GGUF file (test_kquants.gguf_gemma: Q4_K, Q5_0,
Q6_K, Q8_0 and Q4_0 projections, local and global layers with far-apart RoPE bases, random norm
weights, a window of 4 under a 20-token sequence).

It computes what the per-op path (models/gemma3.py, the same K-quant products) computes: one layer
and the whole stack against it, with and without a skipped MLP; rows are independent of the batch
(bit for bit); an fp16 cache holds the fp32 run's keys and values rounded; vanilla greedy through it
equals greedy through the per-op path and self-speculation on it is lossless token for token; bad
shapes are refused by name. Token trees (decoding/token_tree.py): a tree forward matches the per-op
path's dense tree masks layer by layer (sliding-window layers included), gives every node the bits of
decoding its path one token at a time, and greedy `tree` on the stack is vanilla token for token.
"""

from __future__ import annotations

import pytest
import torch

from conftest import char_tokenizer
from exitspec.decoding.api import make_strategy
from exitspec.decoding.token_tree import pack_trees
from exitspec.kernels import build
from exitspec.loading import LoadedModel
from exitspec.models.kquants import kquant_table
from exitspec.runtime.layered import LayeredModel
from helpers_strategies import greedy
from test_gemma3 import LONG_PROMPTS, SEQ, WINDOW
from test_kernels import assert_fused_close
from test_kquants import gguf_gemma
from test_token_tree import _tree_forward_and_paths, random_tree

IDS = torch.tensor([[(7 * t + 3) % 95 for t in range(SEQ)], [(5 * t + 11) % 95 for t in range(SEQ)]])  # (2, SEQ)
POS = torch.arange(SEQ).expand(2, SEQ)


@pytest.fixture
def tiny(kernel_isa, tmp_path):
    """(fused runtime, per-op runtime with the same blocks, the HF model, the blocks, the kernel build)."""
    model = gguf_gemma(tmp_path / "tiny.gguf")
    table = kquant_table(model, tmp_path / "tiny.gguf")
    fused, per_op = LayeredModel(model, int4=table), LayeredModel(model, int4=table, fuse=False)
    assert fused.adapter.fused and not per_op.adapter.fused
    assert SEQ > WINDOW and "sliding_attention" in model.config.layer_types
    return fused, per_op, model, table, kernel_isa


def test_fused_gemma_stack_matches_the_per_op_path(tiny):
    """Same products on the same rounded inputs; the glue (norms, RoPE, GELU, attention) is exitspec's
    own, so the two agree to float rounding except where a last-bit difference moves a product's input
    across a rounding boundary (bf16 per value on AVX-512, int8 per group of 32 on AVX2; see
    test_kernels.test_fused_stack_matches_the_per_layer_path)."""
    fused, per_op, _, _, isa = tiny

    def one_layer(layer, **kw):
        with torch.inference_mode():
            h = fused.run_layers(fused.embed(IDS, POS), POS, fused.new_cache(2, SEQ), 0, layer)
            a = fused.run_layers(h, POS, fused.new_cache(2, SEQ), layer, layer + 1, **kw)
            b = per_op.run_layers(h, POS, per_op.new_cache(2, SEQ), layer, layer + 1, **kw)
        return (a - b).abs(), float(b.abs().max())

    for layer in (0, 1):  # a sliding-window layer, then a global one (their own RoPE bases)
        diff, scale = one_layer(layer)
        assert float(diff.max()) < 1e-2 * scale
        diff, scale = one_layer(layer, skip_mlp={layer})
        assert float(diff.max()) < 1e-2 * scale
        if isa == "avx512bf16":
            assert float((diff <= 1e-5 * scale).float().mean()) >= 0.8
    assert_fused_close(fused, per_op, IDS, POS, isa)


def test_fused_gemma_rows_do_not_depend_on_the_batch_or_the_step_size(tiny):
    fused, _, _, _, _ = tiny
    with torch.inference_mode():
        both = fused.forward(IDS, POS, fused.new_cache(2, SEQ))
        alone = fused.forward(IDS[1:], POS[1:], fused.new_cache(1, SEQ))
        # The same sequence fed a token at a time past the window: each row is the prefill's row.
        cache = fused.new_cache(1, SEQ)
        fused.forward(IDS[:1, :8], POS[:1, :8], cache)
        steps = torch.cat([fused.forward(IDS[:1, t: t + 1], POS[:1, t: t + 1], cache) for t in range(8, SEQ)], 1)
    assert torch.equal(both[1:], alone)
    assert torch.equal(both[:1, 8:], steps)


def test_fused_gemma_keeps_an_fp16_cache(tiny):
    fused, _, model, table, _ = tiny
    half = LayeredModel(model, int4=table, kv_dtype=torch.float16)
    assert half.adapter.fused
    with torch.inference_mode():
        c32, c16 = fused.new_cache(2, SEQ), half.new_cache(2, SEQ)
        a = fused.forward(IDS, POS, c32)
        b = half.forward(IDS, POS, c16)
    assert c16.k.dtype == torch.float16
    # Layer 0's keys are written before any rounded value is read: exactly the fp32 run's, rounded.
    assert torch.equal(c16.k[0], c32.k[0].to(torch.float16)) and torch.equal(c16.v[0], c32.v[0].to(torch.float16))
    assert float((a - b).abs().max()) < 5e-2 * float(a.abs().max())


@pytest.mark.filterwarnings("ignore::exitspec.decoding.api.NoHeadsWarning")  # untrained logit-lens drafts: fine here
def test_fused_gemma_greedy_equals_the_per_op_path_and_self_spec_is_lossless(kernel_isa, tmp_path):
    model = gguf_gemma(tmp_path / "tiny.gguf")
    table = kquant_table(model, tmp_path / "tiny.gguf")
    fused = LoadedModel.from_hf(model, char_tokenizer(), name="tiny-gemma3-fused")
    fused.int4 = table
    assert fused.lm.adapter.fused
    ref = greedy(fused, LONG_PROMPTS, n=20).token_ids
    assert greedy(fused, LONG_PROMPTS, n=20, strategy="self-spec", exit_layer=2, draft_len=3).token_ids == ref
    per_op = LoadedModel.from_hf(model, char_tokenizer(), name="tiny-gemma3-per-op")
    per_op.lm = LayeredModel(model, int4=table, fuse=False)  # the cached runtime, set before first use
    # The glue's rounding differs from torch's in the last bits; greedy over a 96-token vocabulary is
    # not sensitive to that on these prompts (a tie within 1e-5 would be needed to flip a token).
    assert greedy(per_op, LONG_PROMPTS, n=20).token_ids == ref


def test_fused_gemma_tree_forward_matches_the_per_op_dense_tree_masks(tiny):
    """Two rows of 9 prompt tokens, then a 12-node random tree each (as deep as the window): each
    layer's tree forward on the stack against the per-op path's dense masks over the same cache, a
    sliding-window layer and a global one, as test_fused_gemma_stack_matches_the_per_op_path bounds
    them; a tree's windowed query sees the positions its path occupies, not its nodes' slots."""
    fused, per_op, _, _, isa = tiny
    root = 9
    trees = [random_tree(12, 3), random_tree(12, 4)]  # tokens: the node indices
    assert max(max(t.depths) for t in trees) >= WINDOW  # the deepest nodes' windows leave out their root
    ids, pos, masks = pack_trees(trees, [root, root])

    def prompt_cache(lm: LayeredModel):
        cache = lm.new_cache(2, 32)
        fused.forward(IDS[:, :root], POS[:, :root], cache)  # the same prompt keys for both paths
        return cache

    def tree_layers(lm: LayeredModel, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return lm.run_layers(h, pos, prompt_cache(lm), start, stop, ctx=lm.context(h, pos, tree=masks))

    with torch.inference_mode():
        h = fused.embed(ids, pos)
        for layer in (0, 1):  # a sliding-window layer, then a global one
            a, b = tree_layers(fused, h, layer, layer + 1), tree_layers(per_op, h, layer, layer + 1)
            diff, scale = (a - b).abs(), float(b.abs().max())
            assert float(diff.max()) < 1e-2 * scale, layer
            if isa == "avx512bf16":
                assert float((diff <= 1e-5 * scale).float().mean()) >= 0.8, layer
            h = a


def test_fused_gemma_stack_verifies_a_tree_with_plain_decodings_bits(tiny):
    """Every node's logits are bit for bit those of decoding its path one token per call (the window
    of 4 cuts into the 7- and 9-token prompts), and keep_path leaves the cache decoding would."""
    fused, *_ = tiny
    _tree_forward_and_paths(fused, exact=True)


def test_fused_gemma_greedy_tree_lookup_is_vanilla_token_for_token(kernel_isa, tmp_path):
    model = gguf_gemma(tmp_path / "tiny.gguf")
    m = LoadedModel.from_hf(model, char_tokenizer(), name="tiny-gemma3-tree")
    m.int4 = kquant_table(model, tmp_path / "tiny.gguf")
    assert m.lm.adapter.fused and m.lm.takes_trees
    ref = greedy(m, LONG_PROMPTS, n=40).token_ids
    strat = make_strategy("tree", m, width=4, max_nodes=16, adaptive=False)
    assert greedy(m, LONG_PROMPTS, n=40, strategy=strat).token_ids == ref
    assert strat.cycles["tree"] > 0  # real trees went through the stack, not only chains
    assert greedy(m, LONG_PROMPTS[-1], n=40, strategy="tree").token_ids[0] == ref[-1]  # adaptive sizing


def test_fused_gemma_stack_refuses_bad_shapes_by_name(kernel_isa):
    ops = build.load_isa(kernel_isa)
    with pytest.raises(RuntimeError, match="unsupported Gemma 3 shape"):
        ops.GemmaStack(640, 4, 1, 24, 2048, 0.0625)  # head dim 24: not one the attention kernel takes
    stack = ops.GemmaStack(64, 4, 2, 16, 128, 0.25)
    raw = torch.zeros(128, 64 // 32 * 34, dtype=torch.uint8)  # Q8_0 blocks (type 8), all zero
    qkv, o = ops.QuantMatrix(64, [(8, raw)]), ops.QuantMatrix(64, [(8, raw[:64])])
    gate_up = ops.QuantMatrix(64, [(8, raw), (8, raw)])
    down = ops.QuantMatrix(128, [(8, torch.zeros(64, 128 // 32 * 34, dtype=torch.uint8))])
    c, d = torch.ones(64), torch.ones(16)
    with pytest.raises(RuntimeError, match="q_norm must have 16 values"):
        stack.add_layer(qkv, o, gate_up, down, c, c, c, c, c, d, 1e-6, 0, 0)
    with pytest.raises(RuntimeError, match="layer weights do not match"):
        stack.add_layer(qkv, o, gate_up, gate_up, c, c, c, c, d, d, 1e-6, 0, 0)
    stack.add_layer(qkv, o, gate_up, down, c, c, c, c, d, d, 1e-6, 0, 1)
    h, cache = torch.zeros(1, 1, 64), torch.zeros(1, 1, 2, 16, 16)
    cs = torch.ones(1, 1, 1, 16)  # one RoPE table, but the layer reads table 1
    with pytest.raises(RuntimeError, match="reads RoPE table 1 of 1"):
        stack.forward(h, cache, cache, torch.zeros(1, 1, dtype=torch.long), cs, cs, 0, 1, [])
    with pytest.raises(RuntimeError, match="position outside the KV cache"):
        stack.forward(h, cache, cache, torch.full((1, 1), 16, dtype=torch.long), cs, cs, 0, 1, [])
    cs2 = torch.ones(2, 1, 2, 16)
    h2, p2 = torch.zeros(1, 2, 64), torch.tensor([[3, 4]])
    with pytest.raises(RuntimeError, match="tree masks must be \\(batch, new tokens\\)"):
        stack.forward(h2, cache, cache, p2, cs2, cs2, 0, 1, [], tree=torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="must see the root"):
        stack.forward(h2, cache, cache, p2, cs2, cs2, 0, 1, [], tree=torch.tensor([[1, 2]]))
