"""Draft token trees from a lookahead head (heads/lookahead.py), expanded the way EAGLE-2 does.

After a verification the strategy keeps, per row, the full model's final hidden state at the last
accepted position (h_t) and knows the pending token x_{t+1}. The head turns (h_t, x_{t+1}) into a
guessed feature of position t+1, whose logits over the head's draft vocabulary give candidates for
x_{t+2}; each candidate, with that feature, is the input of the next step. Expansion (Li et al.
2024, EAGLE-2: "faster inference of language models with dynamic draft trees"): at every depth the
`frontier` nodes with the highest cumulative draft probability (product of the draft's softmax
along the path) are expanded by their `topk` children, one head call for all of them; all nodes
drafted are returned with that probability, which EAGLE-2 found a good estimate of a node's chance
of being accepted. The tree strategy (strategies/tree_lookup.py) merges them with its context and
datastore candidates and keeps the nodes worth their verification cost.

Cost: up to `depth` head calls per cycle (expansion stops early when no frontier path is above
`min_prob`: nodes that unlikely are never worth a verification position), each over at most
`frontier` rows per tree (a few rows cost what one costs on a memory-bound CPU), plus the draft
vocabulary's rows of the LM head (on the int4 runtime's int8 kernel, draft_vocab.subset_rows).

Determinism: a sampled row's tree must not depend on which rows share its batch (a seeded request
gives the same output in any batch, engine.py), and a product's low bits can depend on its row
count; so sampled rows are drafted one at a time, greedy rows together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from exitspec.decoding.draft_vocab import subset_rows
from exitspec.heads.lookahead import LookaheadHead
from exitspec.models.int4 import Q8Linear


@dataclass
class DraftNodes:
    """One row's drafted nodes, parents before children: node i continues node parents[i] (-1: the
    pending token) with tokens[i]; probs[i] is the cumulative draft probability of its path."""

    tokens: list[int]
    parents: list[int]
    probs: list[float]

    def paths(self) -> list[list[int]]:
        """Each node's tokens from the pending token's first child down to it."""
        out: list[list[int]] = []
        for t, p in zip(self.tokens, self.parents, strict=True):
            out.append((out[p] if p >= 0 else []) + [t])
        return out


class LookaheadDrafter:
    def __init__(self, head: LookaheadHead, depth: int = 4, topk: int = 4, frontier: int = 4, min_prob: float = 0.05):
        for name, v in (("depth", depth), ("topk", topk), ("frontier", frontier)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"lookahead {name} must be an integer >= 1, got {v!r}")
        if not 0 <= min_prob < 1:
            raise ValueError(f"lookahead min_prob must be in [0, 1), got {min_prob!r}")
        self.head, self.depth, self.topk, self.frontier = head, depth, topk, frontier
        self.min_prob = math.log(min_prob) if min_prob > 0 else -math.inf
        self.proj = subset_rows(head.lm, head.vocab)  # final-normed (..., C) -> (..., N)
        self.vocab = head.vocab
        # On the int4 runtime the head's three products run on the int8 kernel too (its weights rounded
        # to Q8_0: drafts only, verification decides): torch's fp32 product of a few rows costs several
        # times one row's, the kernel about one row's (models/int4.Q8Linear).
        self.linears = None
        if head.lm.weights == "int4":
            fast = [Q8Linear.quantized(lin.weight) for lin in head.linears()]
            self.linears = tuple(fast) if all(f is not None for f in fast) else None

    @torch.inference_mode()
    def draft(self, hidden: torch.Tensor, pending: list[int], together: bool = True) -> list[DraftNodes]:
        """hidden (B, C): each row's final hidden state (before the final norm) at its last accepted
        position; pending: each row's pending token. together=False drafts row by row (see above)."""
        if not together:
            return [self._draft(hidden[b:b + 1], pending[b:b + 1])[0] for b in range(len(pending))]
        return self._draft(hidden, pending)

    def _draft(self, hidden: torch.Tensor, pending: list[int]) -> list[DraftNodes]:
        lm, B, k = self.head.lm, len(pending), self.topk
        feats = hidden[:, None]  # (B, M, C): the frontier's input features, M = 1 (any scale: head.forward)
        toks = torch.tensor(pending, device=hidden.device)[:, None]  # (B, M): the frontier's tokens
        logp = [[0.0] for _ in range(B)]  # (B, M): cumulative log-probability
        at = [[-1] for _ in range(B)]  # (B, M): the frontier's node index (-1: root)
        nodes = [DraftNodes([], [], []) for _ in range(B)]
        for depth in range(self.depth):
            M = toks.shape[1]
            out = self.head(feats, toks, self.linears)  # (B, M, C) guessed features one position on
            logits = self.proj(lm.norm(out)).float()  # (B, M, N)
            top, top_i = logits.topk(k, -1)  # (B, M, k): the top of the log-softmax is the top of the logits
            top_lp = (top - logits.logsumexp(-1, keepdim=True)).tolist()
            ids = self.vocab[top_i].tolist()
            # Record every child (Python lists: a few dozen numbers, cheaper than tensor ops); the next
            # frontier is the best `frontier` of them by path probability (EAGLE-2).
            frontier = []
            for b in range(B):
                n, row = nodes[b], []
                for m in range(M):
                    for j in range(k):
                        lp = logp[b][m] + top_lp[b][m][j]
                        row.append((lp, len(n.tokens), m, ids[b][m][j]))
                        n.tokens.append(ids[b][m][j])
                        n.parents.append(at[b][m])
                        n.probs.append(math.exp(lp))
                row.sort(key=lambda r: -r[0])
                frontier.append(row[: self.frontier])
            if depth + 1 == self.depth or max(f[0][0] for f in frontier) < self.min_prob:
                break  # the last depth, or no path likely enough to be worth going on
            parent = torch.tensor([[r[2] for r in f] for f in frontier], device=out.device)  # (B, F)
            feats = out.gather(1, parent[:, :, None].expand(-1, -1, out.shape[-1]))
            toks = torch.tensor([[r[3] for r in f] for f in frontier], device=out.device)
            logp = [[r[0] for r in f] for f in frontier]
            at = [[r[1] for r in f] for f in frontier]
        return nodes
