"""Verification of a token tree: which path of drafted candidates to keep, and the token after it.

The tree counterpart of speculative.verify (one draft chain per row). The target model has scored
every node of a row's tree in one forward (decoding/token_tree.py): target_logits[b, i] is its
distribution for the token after node i's path. Verification walks down from the root:

Greedy: at node i take the target's argmax; if a child of i holds it, move there and go on, else stop.
The argmax is the correction (or bonus) token. Every token emitted is the target's argmax after its
own prefix, so greedy output equals vanilla's token for token.

Sampling: multi-candidate rejection sampling (SpecInfer's rule, Miao et al. 2024; the "recursive
rejection sampling" of Yang et al. 2024, Jeon et al. 2024), for drafts that are deterministic given
the context (copied from the context or the datastore: q is one-hot at each candidate, and a trie's
children are distinct tokens). At a node with target p and children x1..xk, in order: keep x1 with
probability p(x1); if rejected, remove x1 from p (the residual max(0, p - onehot(x1)) renormalised)
and try x2 against that, and so on; when every child is rejected, draw from the residual. Then
P(x1) = p(x1), P(x2) = (1 - p(x1)) * p(x2) / (1 - p(x1)) = p(x2), ..., P(y not a child) = p(y): the
emitted token follows p, and below a kept child the same holds for the next position given the
prefix. Children drawn at random (an exit head's samples) would need their own q in the test and
the residual; this module takes only deterministic drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exitspec.decoding.sampling import RowSampling, Sampling, SamplingParams, greedy_tokens, probs, sample_from
from exitspec.decoding.token_tree import TokenTree


@dataclass
class TreeVerdict:
    paths: list[list[int]]  # per row: the accepted nodes from the root (paths[b][0] == 0)
    next_tokens: list[int]  # per row: the correction (or bonus) token; it becomes pending

    def tokens(self, trees: Sequence[TokenTree]) -> list[list[int]]:
        """Per row, the new tokens: the accepted drafts (the path below the root), then next_tokens."""
        return [t.path_tokens(p[1:]) + [n] for t, p, n in zip(trees, self.paths, self.next_tokens, strict=True)]


def verify_tree(
    target_logits: torch.Tensor,  # (B, T, V): the target's logits after each node (T >= every tree's size)
    trees: Sequence[TokenTree],
    params: Sampling,  # one setting, or each row's (RowSampling, which carries the generators)
    generator: torch.Generator | None = None,
) -> TreeVerdict:
    B = target_logits.shape[0]
    rows = [_row(params, generator, b) for b in range(B)]
    greedy = [p.greedy for p, _ in rows]
    paths: list[list[int]] = [[0] for _ in range(B)]
    nxt = [0] * B
    if any(greedy):
        top = greedy_tokens(target_logits).tolist()  # (B, T) one host transfer for every greedy walk
        for b in (b for b in range(B) if greedy[b]):
            node = 0
            while (child := trees[b].child(node, top[b][node])) is not None:
                node = child
                paths[b].append(node)
            nxt[b] = top[b][node]
    if not all(greedy):
        p = probs(target_logits, params)  # (B, T, V): the same warping as plain sampling
        for b in (b for b in range(B) if not greedy[b]):
            paths[b], nxt[b] = _sample_walk(p[b], trees[b], rows[b][1])
    return TreeVerdict(paths=paths, next_tokens=nxt)


def _row(params: Sampling, generator: torch.Generator | None, b: int) -> tuple[SamplingParams, torch.Generator | None]:
    """Row b's setting and the generator it draws from."""
    if isinstance(params, RowSampling):
        return params.params[b], params.generators[b]
    return params, generator


def _sample_walk(p: torch.Tensor, tree: TokenTree, g: torch.Generator | None) -> tuple[list[int], int]:
    """One row's rejection walk over p (T, V), the target distribution after each node."""
    node, path = 0, [0]
    while True:
        residual = p[node].double()  # float64: a long run of rejections renormalises repeatedly
        kept = None
        for token, child in tree.children[node].items():
            mass = residual.sum()
            u = float(torch.rand((), generator=g, device=p.device))
            # Keep the child with probability residual(x) / mass (q is one-hot at x).
            if u * mass < residual[token]:
                kept = child
                break
            residual = residual.clone()
            residual[token] = 0.0  # max(0, p - onehot(x)): x is the only entry q covers
        if kept is None:
            mass = residual.sum()
            # Every candidate held all of p's mass and was rejected: only possible at probability 0,
            # but a rounding leftover could get there; p itself is then the safe draw.
            dist = residual / mass if mass > 0 else p[node].double()
            return path, int(sample_from(dist.float(), g))
        node = kept
        path.append(node)
