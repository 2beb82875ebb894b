"""Token trees: several candidate continuations of a row, verified in one forward.

A speculative cycle usually verifies one draft, a chain of k tokens after the pending one. When
several sources disagree (the context's latest and earlier matches, the datastore's, ...), a chain
has to bet on one of them; a tree verifies them all at once, merged as a trie so that a shared
prefix costs one position (SpecInfer, Miao et al. 2024; Medusa's and EAGLE's trees).

Layout (what the runtime runs, runtime/layered.LayeredModel.context(tree=...)): node 0 is the root,
the row's pending token; every node comes after its parent, so node i's ancestors have indices < i.
A cycle writes node i to cache slot root + i at position root + depth(i), and node i sees the slots
before the root and the slots of its ancestors and itself: bit j of masks()[i] is set when node j is
one of them. After verification the accepted path's keys and values move to slots root + depth
(KVCache.keep_path), so the row reads as if the path had been decoded one token at a time.

Kept in Python lists: trees have a few dozen nodes at most (MAX_TREE_NODES, the kernel's limit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from exitspec.runtime.layered import MAX_TREE_NODES

__all__ = ["MAX_TREE_NODES", "TokenTree", "pack_trees"]


class TokenTree:
    """A trie of candidate continuations after one root token."""

    def __init__(self, root: int):
        self.tokens: list[int] = [root]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self.children: list[dict[int, int]] = [{}]  # node -> {token: child node}, in insertion order

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, tokens: Sequence[int], max_nodes: int = MAX_TREE_NODES) -> list[int]:
        """Insert a continuation of the root; returns the nodes along it, as far as it fits in
        max_nodes (a prefix shared with an earlier continuation adds no node)."""
        node, path = 0, []
        for t in tokens:
            child = self.children[node].get(int(t))
            if child is None:
                if len(self.tokens) >= max_nodes:
                    break
                child = len(self.tokens)
                self.tokens.append(int(t))
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1)
                self.children.append({})
                self.children[node][int(t)] = child
            node = child
            path.append(node)
        return path

    def child(self, node: int, token: int) -> int | None:
        return self.children[node].get(token)

    def path_tokens(self, path: Sequence[int]) -> list[int]:
        return [self.tokens[i] for i in path]

    def masks(self) -> list[int]:
        """Per node, the bits of its ancestors and itself, as int64 values (bit 63 is the sign bit)."""
        out: list[int] = []
        for i, parent in enumerate(self.parents):
            out.append((out[parent] if parent >= 0 else 0) | (1 << i))
        return [_int64(m) for m in out]

    def is_chain(self) -> bool:
        """Every node the child of the one before: plain causal verification does the same work."""
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def subtree(self, keep: Sequence[int]) -> tuple[TokenTree, list[int]]:
        """The tree of the root and the nodes `keep` (each listed after its parent), renumbered in that
        order; also the old index of each new node."""
        new = TokenTree(self.tokens[0])
        at = {0: 0}
        order = [0] + [i for i in keep if i != 0]
        for i in order[1:]:
            parent = at.get(self.parents[i])
            if parent is None:
                raise ValueError(f"node {i} is kept before (or without) its parent {self.parents[i]}")
            at[i] = len(new.tokens)
            new.tokens.append(self.tokens[i])
            new.parents.append(parent)
            new.depths.append(self.depths[i])
            new.children.append({})
            new.children[parent][self.tokens[i]] = at[i]
        return new, order


def pack_trees(trees: Sequence[TokenTree], roots: Sequence[int], device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ids, positions, masks), each (B, T) with T the largest tree, for one forward over every row's
    tree (`roots`: each root's position). Padding fills a smaller tree: when every tree is a chain, the
    chain goes on repeating its last token and masks is None (plain causal verification, no mask
    needed); otherwise pads are copies of the root as extra children of the root (depth 1). Either way
    the pads are valid nodes whose results are never read: verification follows a tree's own children."""
    T = max(len(t) for t in trees)
    chains = all(t.is_chain() for t in trees)
    ids, pos, masks = [], [], []
    for tree, root in zip(trees, roots, strict=True):
        pad = T - len(tree)
        if chains:
            ids.append(tree.tokens + [tree.tokens[-1]] * pad)
            pos.append(list(range(root, root + T)))
            continue
        ids.append(tree.tokens + [tree.tokens[0]] * pad)
        pos.append([root + d for d in tree.depths] + [root + 1] * pad)
        masks.append(tree.masks() + [_int64(1 | (1 << i)) for i in range(len(tree), T)])
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(ids), as_tensor(pos), None if chains else torch.tensor(masks, dtype=torch.long)


def _int64(m: int) -> int:
    """A 64-bit mask as the int64 value with the same bits."""
    return m - (1 << 64) if m >= 1 << 63 else m
