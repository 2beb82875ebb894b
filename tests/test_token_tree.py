"""Token-tree verification: the kernel's tree masks against a dense masked reference and against plain
decoding, the runtime's tree forward and KV compaction, greedy equality with vanilla, the sampling
rule's distribution, and refusals of impossible trees and settings."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, KERNEL_ISAS, exercise, tiny_loaded
from exitspec.decoding.api import make_strategy
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.sampling import SamplingParams
from exitspec.decoding.token_tree import TokenTree, pack_trees
from exitspec.decoding.tree_verify import verify_tree
from exitspec.kernels import build
from exitspec.runtime.layered import LayeredModel
from helpers_strategies import PROMPTS, greedy
from test_int4 import quantized_tiny


@pytest.fixture(params=KERNEL_ISAS or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no exitspec kernels for this CPU: {build.chosen_isa()[1]}"))])
def ops(request):
    exercise(request.param)
    return build.load_isa(request.param)


def random_tree(n: int, seed: int) -> TokenTree:
    """n nodes, each the child of a random earlier node (tokens: the node's index, so all distinct)."""
    g = torch.Generator().manual_seed(seed)
    tree = TokenTree(0)
    for i in range(1, n):
        parent = int(torch.randint(0, i, (), generator=g))
        tree.tokens.append(i)
        tree.parents.append(parent)
        tree.depths.append(tree.depths[parent] + 1)
        tree.children.append({})
        tree.children[parent][i] = i
    return tree


def ancestors(tree: TokenTree, node: int) -> list[int]:
    out = [node]
    while tree.parents[out[-1]] >= 0:
        out.append(tree.parents[out[-1]])
    return out[::-1]


def test_a_trie_merges_shared_prefixes_and_masks_name_ancestors():
    tree = TokenTree(7)
    assert tree.add([1, 2, 3]) == [1, 2, 3]
    assert tree.add([1, 2, 4]) == [1, 2, 4]  # shares 1 2: one new node
    assert tree.add([5, 6], max_nodes=6) == [5]  # the budget stops it
    assert tree.tokens == [7, 1, 2, 3, 4, 5] and tree.depths == [0, 1, 2, 3, 3, 1]
    assert tree.masks() == [0b1, 0b11, 0b111, 0b1111, 0b10111, 0b100001]
    assert not tree.is_chain() and TokenTree(3).is_chain()
    small, order = tree.subtree([1, 5, 2])
    assert order == [0, 1, 5, 2] and small.tokens == [7, 1, 5, 2] and small.parents == [-1, 0, 0, 1]
    with pytest.raises(ValueError, match=r"without\) its parent"):
        tree.subtree([2])
    ids, pos, masks = pack_trees([tree, small], [10, 30])
    assert ids[1].tolist() == [7, 1, 5, 2, 7, 7] and pos[1].tolist() == [30, 31, 31, 32, 31, 31]
    assert masks[1].tolist() == [0b1, 0b11, 0b101, 0b1011, 0b10001, 0b100001]  # pads: children of the root
    chain = TokenTree(4)
    chain.add([5, 6])
    ids, pos, masks = pack_trees([chain, TokenTree(9)], [3, 8])
    assert masks is None and ids.tolist() == [[4, 5, 6], [9, 9, 9]] and pos.tolist() == [[3, 4, 5], [8, 9, 10]]
    big = random_tree(64, seed=0)
    assert big.masks()[63] < 0  # bit 63 is int64's sign bit


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_tree_attention_matches_a_dense_masked_reference_and_plain_decoding_bit_for_bit(ops, window, head_dim):
    """Every tree query: within 1e-5 of float64 softmax attention over its visible slots, and the very
    bits a 1-row plain (causal) call gives when its path is laid out in sequence order, as decoding the
    path one token at a time would have written it."""
    torch.manual_seed(0)
    B, T, H, Hkv, slots = 2, 12, 4, 2, 96
    trees, bases = [random_tree(T, 1), random_tree(T, 2)], [20, 47]
    kc, vc = torch.randn(B, Hkv, slots, head_dim), torch.randn(B, Hkv, slots, head_dim)
    q = torch.randn(B * T, H, head_dim)
    ids, pos, masks = pack_trees(trees, bases)
    pos = pos.view(-1)
    scale = head_dim ** -0.5
    out = ops.attention(q, kc, vc, pos, T, scale, window, tree=masks)
    group = H // Hkv
    for r in range(B * T):
        b, t = divmod(r, T)
        tree, base, p = trees[b], bases[b], int(pos[r])
        path = ancestors(tree, t)
        # sequence order: slots < base as they are, then the path's nodes at base + depth
        k2, v2 = kc[b:b + 1].clone(), vc[b:b + 1].clone()
        for d, node in enumerate(path):
            k2[0, :, base + d], v2[0, :, base + d] = kc[b, :, base + node], vc[b, :, base + node]
        lo = max(0, p - window + 1) if window else 0
        for h in range(H):
            keys, vals = k2[0, h // group, lo:p + 1].double(), v2[0, h // group, lo:p + 1].double()
            ref = torch.softmax(keys @ q[r, h].double() * scale, 0) @ vals
            assert float((out[r, h].double() - ref).abs().max()) < 1e-5, (r, h)
        alone = ops.attention(q[r:r + 1].contiguous(), k2, v2, pos[r:r + 1].contiguous(), 1, scale, window)
        assert torch.equal(alone[0], out[r]), r


def test_the_kernel_refuses_impossible_trees(ops):
    kc = torch.zeros(1, 1, 96, 16)
    q = torch.randn(3, 1, 16)
    pos = torch.tensor([10, 11, 11])
    ok = torch.tensor([[1, 3, 5]])  # the root, a child, a second child of the root
    ops.attention(q, kc, kc, pos, 3, 0.25, 0, tree=ok)
    for masks, p, match in [
        ([[1, 7, 5]], pos, "no later node"),  # node 1 sees node 2
        ([[1, 2, 5]], pos, "must see the root"),
        ([[1, 3, 5]], torch.tensor([10, 11, 12]), "root \\+ depth"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops.attention(q, kc, kc, p, 3, 0.25, 0, tree=torch.tensor(masks))
    with pytest.raises(RuntimeError, match="exactly its parent's nodes"):  # node 3 claims node 1, not node 2's
        ops.attention(torch.randn(4, 1, 16), kc, kc, torch.tensor([10, 11, 11, 13]), 4, 0.25, 0,
                      tree=torch.tensor([[1, 3, 5, 15]]))
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        ops.attention(q, kc, kc, torch.tensor([94, 95, 95]), 3, 0.25, 0, tree=ok)
    big = random_tree(65, 0)
    with pytest.raises(RuntimeError, match="at most 64 nodes"):
        ops.attention(torch.randn(65, 1, 16), kc, kc, torch.arange(65), 65, 0.25, 0,
                      tree=torch.ones(1, 65, dtype=torch.long))
    lm = LayeredModel(tiny_loaded("llama").model)
    ids, positions = torch.zeros(1, 65, dtype=torch.long), torch.tensor([[d for d in big.depths]])
    with pytest.raises(ValueError, match="at most 64 tokens per row"):
        lm.context(lm.embed(ids, positions), positions, tree=torch.ones(1, 65, dtype=torch.long))


def _tree_forward_and_paths(lm: LayeredModel, exact: bool) -> None:
    """Two rows with different prompts and trees, one forward: each node's logits against decoding its
    path one token per call; then the chosen paths' keys and values moved into sequence order equal
    what that decoding wrote."""
    prompts = [[5, 17, 33, 2, 60, 41, 7], [8, 1, 4, 4, 70, 12, 90, 15, 6]]
    trees = [TokenTree(9), TokenTree(3)]
    for c in ([11, 3, 4], [11, 8], [20, 21, 22, 23], [11, 3, 5]):
        trees[0].add(c)
    for c in ([40, 41], [42], [40, 43, 44]):
        trees[1].add(c)
    roots = [len(p) for p in prompts]
    L = lm.num_layers
    ids, pos, masks = pack_trees(trees, roots)
    with torch.inference_mode():
        cache = lm.new_cache(2, 32)
        for b, p in enumerate(prompts):  # ragged prefills, one row at a time
            one = lm.new_cache(1, 32)
            lm.forward(torch.tensor([p]), torch.arange(len(p))[None], one)
            cache.k[:, b], cache.v[:, b] = one.k[:, 0], one.v[:, 0]
            cache.lengths[:, b] = len(p)
        h = lm.embed(ids, pos)
        logits = lm.logits(lm.run_layers(h, pos, cache, 0, L, ctx=lm.context(h, pos, tree=masks)))  # (2, T, V)
        chosen = [[0, 1, 4], [0, 1, 4]]  # row 0: 9 11 8; row 1: 3 40 43 (a later branch both times)
        caches = []
        for b, (tree, p) in enumerate(zip(trees, prompts, strict=True)):
            for node in range(len(tree)):
                seq = p + tree.path_tokens(ancestors(tree, node))
                one = lm.new_cache(1, 32)
                lm.forward(torch.tensor([p]), torch.arange(len(p))[None], one)
                for i in range(len(p), len(seq)):  # vanilla: one token per call
                    last = lm.forward(torch.tensor([[seq[i]]]), torch.tensor([[i]]), one)[0, -1]
                if exact:
                    assert torch.equal(logits[b, node], last), (b, node)
                else:
                    assert torch.allclose(logits[b, node], last, atol=1e-4, rtol=1e-4), (b, node)
                if ancestors(tree, node) == chosen[b]:
                    caches.append(one)
        cache.keep_path(roots, chosen)
        cache.rollback(torch.tensor([r + 3 for r in roots]))
    for b, one in enumerate(caches):
        end = roots[b] + 3
        for mine, theirs in ((cache.k, one.k), (cache.v, one.v)):
            if exact:
                assert torch.equal(mine[:, b, :, :end], theirs[:, 0, :, :end])
            else:
                assert torch.allclose(mine[:, b, :, :end], theirs[:, 0, :, :end], atol=1e-5)
    assert cache.lengths[:, 0].tolist() == [roots[0] + 3] * L


def test_the_fused_stack_verifies_a_tree_with_plain_decodings_bits(kernel_isa):
    m = quantized_tiny("llama")
    lm = LayeredModel(m.model, int4=m.int4)
    assert lm.adapter.fused
    _tree_forward_and_paths(lm, exact=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_per_layer_path_verifies_a_tree_as_plain_decoding_does(family):
    """Dense masks over torch's attention (sliding windows included: gemma3's tiny window is 8)."""
    _tree_forward_and_paths(LayeredModel(tiny_loaded(family).model), exact=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tree_lookup_equals_vanilla(family):
    m = tiny_loaded(family)
    ref = greedy(m, PROMPTS, n=30)
    out = greedy(m, PROMPTS, n=30, strategy="tree", depth=4, width=3, max_nodes=12, adaptive=False)
    assert out.token_ids == ref.token_ids  # batch of 4 ragged prompts, different trees per row
    one = greedy(m, PROMPTS[1], n=30, strategy="tree")  # adaptive sizing from the measured cost table
    assert one.token_ids[0] == ref.token_ids[1]
    s = out.stats
    assert 0 < s.accepted <= s.drafted and s.new_tokens == sum(len(t) for t in out.token_ids)


def test_greedy_tree_lookup_on_the_fused_stack_is_vanilla_token_for_token(kernel_isa):
    m = quantized_tiny("llama")
    ref = greedy(m, PROMPTS, n=40)
    strat = make_strategy("tree", m, width=4, max_nodes=16, adaptive=False)
    out = greedy(m, PROMPTS, n=40, strategy=strat)
    assert out.token_ids == ref.token_ids
    assert strat.cycles["tree"] > 0  # some cycles verified real trees, not chains
    # A fused stack that took no tree masks would be refused them; the strategy then verifies chains only.
    m.lm.adapter.fused_tree = False
    with pytest.raises(ValueError, match="takes no token-tree masks"):
        h = m.lm.embed(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]))
        m.lm.context(h, torch.tensor([[0, 1]]), tree=torch.tensor([[1, 3]]))
    strat = make_strategy("tree", m, width=4, max_nodes=16, adaptive=False)
    assert greedy(m, PROMPTS[:2], n=40, strategy=strat).token_ids == ref.token_ids[:2]
    assert strat.cycles["tree"] == 0 and strat.cycles["chain"] > 0


def test_tree_rejection_sampling_follows_the_target_distribution():
    """On a 6-token vocabulary: the root has three candidate children, one of which has two; over
    10000 walks the first token follows p(. | root) and the second, after the deep child, its own p."""
    V, N = 6, 10000
    tree = TokenTree(0)
    tree.add([2, 1])
    tree.add([2, 4])
    tree.add([5])
    tree.add([3])  # nodes: 0 root, 1 '2', 2 '1', 3 '4', 4 '5', 5 '3'
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, len(tree), V, generator=g) * 1.5
    params = SamplingParams(temperature=1.0, seed=1)
    p = logits.softmax(-1)[0]
    gen = params.generator()
    firsts, seconds = [], []
    for _ in range(N):
        v = verify_tree(logits, [tree], params, gen)
        toks = v.tokens([tree])[0]
        firsts.append(toks[0])
        if v.paths[0][1:2] == [1]:  # the first token was the candidate 2: the second is judged at node 1
            seconds.append(toks[1])
    for emitted, target in ((firsts, p[0]), (seconds, p[1])):
        n = len(emitted)
        emp = torch.bincount(torch.tensor(emitted), minlength=V).double() / n
        assert torch.all((emp - target.double()).abs() <= 5 * (target * (1 - target) / n).sqrt() + 2e-3), (emp, target)
    assert len(seconds) > 400  # the deep child (p ~ 0.08 with this seed) was kept often enough to judge


def test_sampled_tree_lookup_runs_and_repeats_with_its_seed():
    m = tiny_loaded("llama")
    kw = dict(n=30, strategy="tree", temperature=0.8, seed=7)
    a, b = greedy(m, PROMPTS[:2], **kw), greedy(m, PROMPTS[:2], **kw)
    assert a.token_ids == b.token_ids and all(len(t) == 30 for t in a.token_ids)
    assert a.stats.drafted > 0


@pytest.mark.parametrize("opts, match", [
    ({"width": 0}, "width .* must be an integer >= 1"),
    ({"max_nodes": 65}, "2..64.*64-bit tree masks"),
    ({"max_nodes": 1}, "2..64"),
    ({"depth": 0}, "depth must be"),
    ({"depth": 20, "max_nodes": 16}, "d \\+ 1 of the tree's max_nodes = 16"),
    ({"depth": 600}, "deeper than the model's context \\(512 positions\\)"),
    ({"adaptive": 1}, "adaptive must be true or false"),
])
def test_impossible_tree_settings_are_refused_with_the_limit_named(opts, match):
    with pytest.raises(StrategyOptionError, match=match):
        greedy(tiny_loaded("llama"), "a", strategy="tree", **opts)
