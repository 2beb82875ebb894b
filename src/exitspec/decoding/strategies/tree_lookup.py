"""Tree lookup: several context / datastore continuations per cycle, verified as one token tree.

Prompt lookup (lookup.py) bets each cycle on one proposal: the continuation of the latest earlier
occurrence of the row's last n tokens, or the datastore's. Where the sources disagree (the phrase
went on differently at its earlier occurrences, the datastore knows another ending) that bet is
often lost. Here every candidate goes into one trie rooted at the pending token (token_tree.py), so
a prefix they share costs one position, and the whole tree is verified in ONE forward with a tree
attention mask (tree_verify.py); the accepted path's keys and values then move into place
(KVCache.keep_path). Greedy output equals vanilla's token for token; sampled output follows the
model's distribution (multi-candidate rejection sampling).

Candidates (their order is the order of a node's children, which sampling tries in turn):
  1. the row's context: the continuations of the last `width` occurrences of its last n tokens, for
     n = max_ngram..2 (longest first, latest first), LZ77-style past the end (NgramIndex.propose);
  2. the draft datastore's continuation after its longest and its shorter matches (datastore.py);
  3. a 1-token context match, only when nothing else matched;
lookup's own proposal from 1 and from 2 first, then the rest of 1 and 2; at most `width` distinct
candidates of up to `depth` tokens;
  4. with `lookahead` on (off by default) and a bundle that has a lookahead head (heads/lookahead.py):
the nodes it drafts from the full model's final hidden state at the last accepted position (decoding/lookahead.py,
EAGLE-2's expansion: the best `frontier` paths by draft probability, `topk` children each, `depth`
deep), after 1-3, most probable first; every cycle, or with `lookahead_always` off only in the
cycles where 1-3 found nothing (hybrid drafting's rule: a copy is free to make). Unlike 1-3 they
need no earlier occurrence: they are the drafts of text the context and the datastore have never seen.

Tree size. A node costs a verification position; past a few positions a step's products turn
compute-bound and every position costs about as much as a row of its own (runtime/profile
.position_costs, measured once per runtime on this CPU). With `adaptive` (default) a greedy row keeps
the nodes most likely to be accepted (each source's running survival rate at that depth,
lookup.AcceptanceTracker; a lookahead node its draft probability, scaled by how often such nodes were
accepted so far; a node shared by several candidates takes the best) as long as the
expected accepted tokens per unit of step cost grow: (1 + sum of the kept nodes' survival) /
cost(positions), over the whole batch's positions when rows share a step. A sampled row keeps its
first `sampled_nodes` (default 4; its rejection walk rarely gets past a few nodes) nodes in candidate
order, never depending on timings or on who shares its batch, so
that a seeded row gives the same output on every run and in any batch (engine.py).
"""

from __future__ import annotations

import torch

from exitspec.decoding.api import register_strategy
from exitspec.decoding.datastore import NgramStore
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.lookahead import DraftNodes, LookaheadDrafter
from exitspec.decoding.strategies.lookup import BATCH_POSITIONS, AcceptanceTracker, NgramIndex, bundle_store
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy
from exitspec.decoding.token_tree import MAX_TREE_NODES, TokenTree, pack_trees
from exitspec.decoding.tree_verify import verify_tree
from exitspec.runtime.profile import interpolate_cost, position_costs


class Occurrences(NgramIndex):
    """An NgramIndex that also keeps the last `keep` occurrences of every n-gram, so that the tree can
    verify how the phrase went on at each of them."""

    def __init__(self, min_n: int, max_n: int, keep: int):
        super().__init__(min_n, max_n)
        self.keep = keep
        self.recent: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in self.ns}

    def update(self, seq: list[int]) -> None:
        for j in range(max(self.seen, 1), len(seq)):
            for n in self.ns:
                if j >= n:
                    at = self.recent[n].setdefault(tuple(seq[j - n:j]), [])
                    at.append(j)  # the copy starts at j; oldest first
                    if len(at) > self.keep:
                        del at[0]
        super().update(seq)

    def continuations(self, seq: list[int], k: int, ns: range) -> list[tuple[list[int], int]]:
        """(up to k tokens, n) after each kept occurrence of seq's last n tokens, for n in ns (longest
        first), latest occurrence first. A copy that reaches the end of seq repeats with its period."""
        self.update(seq)
        out = []
        for n in ns:
            if len(seq) > n:
                for j in reversed(self.recent[n].get(tuple(seq[-n:]), ())):
                    dist, copy = len(seq) - j, seq[j:j + k]
                    while len(copy) < k:
                        copy.append(copy[len(copy) - dist])
                    out.append((copy, n))
        return out


class TreeLookup(Strategy):
    name = "tree"
    lossless = True

    def __init__(self, depth: int = 4, width: int = 4, max_nodes: int = 16, max_ngram: int = 3,
                 store: NgramStore | None = None, adaptive: bool = True, lookahead: LookaheadDrafter | None = None,
                 lookahead_always: bool = True, sampled_nodes: int | None = None):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise StrategyOptionError(f"width (candidate continuations per cycle) must be an integer >= 1, got "
                                      f"{width!r}; for no drafts at all use strategy='vanilla'")
        if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or not 2 <= max_nodes <= MAX_TREE_NODES:
            raise StrategyOptionError(f"max_nodes must be an integer in 2..{MAX_TREE_NODES}, got {max_nodes!r}: the "
                                      f"pending token and at least one draft, and at most {MAX_TREE_NODES} nodes, "
                                      "the most the attention kernel's 64-bit tree masks hold")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth < max_nodes:
            raise StrategyOptionError(f"depth must be an integer in 1..{max_nodes - 1} (a path of d drafts needs "
                                      f"d + 1 of the tree's max_nodes = {max_nodes} nodes), got {depth!r}")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or not 2 <= max_ngram <= 16:
            raise StrategyOptionError(f"max_ngram must be an integer in 2..16, got {max_ngram!r}")
        if not isinstance(adaptive, bool):
            raise StrategyOptionError(f"adaptive must be true or false, got {adaptive!r}")
        self.depth, self.width, self.max_nodes, self.max_ngram = depth, width, max_nodes, max_ngram
        sampled_nodes = min(4, max_nodes) if sampled_nodes is None else sampled_nodes
        if isinstance(sampled_nodes, bool) or not isinstance(sampled_nodes, int) or \
                not 2 <= sampled_nodes <= max_nodes:
            raise StrategyOptionError(f"sampled_nodes must be an integer in 2..max_nodes ({max_nodes}), got "
                                      f"{sampled_nodes!r}")
        if not isinstance(lookahead_always, bool):
            raise StrategyOptionError(f"lookahead_always must be true or false, got {lookahead_always!r}")
        self.store, self.adaptive, self.lookahead = store, adaptive, lookahead
        self.lookahead_always, self.sampled_nodes = lookahead_always, sampled_nodes
        self.indexes: list[Occurrences] = []
        # Per row, the final hidden state (C,) at its last accepted position, which the lookahead head
        # drafts from (None until the row's first verification: prefill keeps no hidden states).
        self.hidden: list[torch.Tensor | None] = []
        # Lookahead nodes kept in verified trees: summed draft probability, and how many were accepted;
        # their ratio rescales the draft probability into a chance of acceptance (gains()).
        self.head_expected, self.head_accepted = 1.0, 1.0
        self.tracker = AcceptanceTracker(depth)
        self.costs: dict[int, float] | None = None  # position_costs of the runtime, read on first use
        self.cycles = {"tree": 0, "chain": 0}  # forwards that verified a branching tree / chains only

    # --- the engine's contract --------------------------------------------------------------------
    def extra_positions(self) -> int:
        return self.max_nodes  # the tree fills slots root..root + nodes - 1 before the path moves back

    def new_index(self) -> Occurrences:
        return Occurrences(1, self.max_ngram, self.width)

    def prepare(self, state: DecodeState) -> None:
        self.indexes = [self.new_index() for _ in state.seqs]
        self.hidden = [None] * len(state.seqs)
        self.tracker = AcceptanceTracker(self.depth)

    def add_rows(self, state: DecodeState, n: int) -> None:
        self.indexes += [self.new_index() for _ in range(n)]
        self.hidden += [None] * n

    def select_rows(self, keep: list[int]) -> None:
        self.indexes = [self.indexes[i] for i in keep]
        self.hidden = [self.hidden[i] for i in keep]

    def warm_up(self, lm, max_rows: int) -> None:
        if self.adaptive:
            self.cost_table(lm)

    def cost_table(self, lm) -> dict[int, float]:
        if self.costs is None:
            self.costs = position_costs(lm, max(BATCH_POSITIONS, self.max_nodes))
        return self.costs

    # --- drafting -----------------------------------------------------------------------------------
    def candidates(self, index: Occurrences, seq: list[int]) -> list[tuple[list[int], str]]:
        """Up to `width` distinct continuations and their sources, strongest evidence first."""
        ctx = [(c, f"context{n}") for c, n in index.continuations(seq, self.depth, range(self.max_ngram, 1, -1))]
        store = [] if self.store is None else \
            [(c, f"datastore{n}") for c, n in self.store.propose_each(seq, self.depth)]
        # What lookup would propose from each source comes first, then the other occurrences and matches.
        found = ctx[:1] + store[:1] + ctx[1:] + store[1:]
        if not found:
            found = [(c, "context1") for c, _ in index.continuations(seq, self.depth, range(1, 0, -1))]
        out, seen = [], set()
        for c, src in found:
            if c and tuple(c) not in seen:
                seen.add(tuple(c))
                out.append((c, src))
        return out[: self.width]

    def build(self, cands: list[tuple[list[int], str]], root: int, branch: bool = True,
              drafted: DraftNodes | None = None, room: int | None = None
              ) -> tuple[TokenTree, list[tuple[str, list[int]]], dict[int, float]]:
        """The row's tree after its pending token `root` (at most `room` nodes, default max_nodes,
        candidates in order, then the lookahead nodes), each candidate's source and nodes in it, and
        the lookahead nodes' draft probabilities by node; with branch=False (a runtime whose fused stack
        takes no tree masks) only the first candidate, a chain."""
        room = room or self.max_nodes
        tree = TokenTree(root)
        cands = cands[: None if branch else 1]
        placed = [(src, tree.add(c, room)) for c, src in cands]
        head: dict[int, float] = {}
        if drafted is not None and (branch or not cands):
            for path, p in sorted(zip(drafted.paths(), drafted.probs, strict=True), key=lambda x: (-x[1], len(x[0]))):
                nodes = tree.add(path, room)
                if len(nodes) == len(path):  # parents first: a path whose end fits has every ancestor in
                    head[nodes[-1]] = max(head.get(nodes[-1], 0.0), p)
                if not branch:
                    break
        return tree, placed, head

    def gains(self, tree: TokenTree, placed: list[tuple[str, list[int]]], head: dict[int, float]) -> list[float]:
        """Per node, the chance it is accepted as the source survival rates see it, or a lookahead
        node's draft probability rescaled by the head's record (the root: 1)."""
        out = [1.0] + [0.0] * (len(tree) - 1)
        for src, nodes in placed:
            surv = self.tracker.survival(src)
            for node in nodes:
                out[node] = max(out[node], surv[tree.depths[node] - 1])
        scale = self.head_accepted / self.head_expected
        for node, p in head.items():
            out[node] = max(out[node], min(1.0, p * scale))
        return out

    def sizes(self, gains: list[list[float]], greedy: list[bool], costs: dict[int, float]) -> list[int]:
        """Nodes per row. Greedy rows: one common count T (a batch's rows are padded to its largest
        tree anyway) with the most expected tokens per unit of step cost, each row keeping its T most
        likely nodes; sampled rows keep their whole tree, and T never goes below it (module docstring)."""
        B = len(gains)
        ranked = [sorted(g[1:], reverse=True) for g in gains]
        floor = max((len(g) for g, gr in zip(gains, greedy, strict=True) if not gr), default=1)
        longest = min(max(len(g) for g in gains), self.max_nodes)
        best_t, best = longest, -1.0
        for t in range(floor, longest + 1):
            tokens = sum(1.0 + sum(r[: t - 1]) for r in ranked)
            rate = tokens / interpolate_cost(costs, B * t)
            if rate > best:
                best_t, best = t, rate
        return [min(best_t, len(g)) if gr else len(g) for g, gr in zip(gains, greedy, strict=True)]

    @staticmethod
    def prune(tree: TokenTree, placed: list[tuple[str, list[int]]], gains: list[float], n: int
              ) -> tuple[TokenTree, list[tuple[str, list[int]]], list[int]]:
        """The n nodes of the highest gain (ties: shallower, then earlier), renumbered. A node's gain
        never exceeds its parent's (survival falls with depth; a candidate through the node passes
        through its parent), so parents come first and the kept set is a tree. Also the old index of
        each kept node."""
        if n >= len(tree):
            return tree, placed, list(range(len(tree)))
        keep = sorted(range(1, len(tree)), key=lambda i: (-gains[i], tree.depths[i], i))[: n - 1]
        keep.sort(key=lambda i: (tree.depths[i], i))  # parents before children whatever rounding did
        small, order = tree.subtree(keep)
        new = {old: i for i, old in enumerate(order)}
        moved = []
        for src, nodes in placed:
            kept = []
            for node in nodes:
                if node not in new:
                    break
                kept.append(new[node])
            moved.append((src, kept))
        return small, moved, order

    # --- the step -------------------------------------------------------------------------------------
    def draft_lookahead(self, state: DecodeState, greedy: list[bool], want: list[bool]) -> list[DraftNodes | None]:
        """Each row's lookahead nodes (None: no head, not `want`ed, or no verification of the row yet).
        Greedy rows are drafted together, sampled rows one at a time (decoding/lookahead.py: determinism)."""
        out: list[DraftNodes | None] = [None] * state.batch
        if self.lookahead is None:
            return out
        for group, together in (([b for b, g in enumerate(greedy) if g], True),
                                ([b for b, g in enumerate(greedy) if not g], False)):
            group = [b for b in group if want[b] and self.hidden[b] is not None]
            if group:
                hidden = torch.stack([self.hidden[b] for b in group])  # (G, C)
                drafted = self.lookahead.draft(hidden, [state.seqs[b][-1] for b in group], together)
                for b, nodes in zip(group, drafted, strict=True):
                    out[b] = nodes
        return out

    def step(self, state: DecodeState) -> StepOutput:
        lm, cache, params = state.lm, state.cache, state.sampling
        L = lm.num_layers
        _, p0 = state.pending()  # (B, 1)
        roots = p0[:, 0].tolist()
        B, dev = len(roots), p0.device
        greedy = [p.greedy for p in params.params]
        adapt = self.adaptive and any(greedy)
        cands = [self.candidates(ix, seq) for ix, seq in zip(self.indexes, state.seqs, strict=True)]
        # The head drafts every cycle, or (lookahead_always off) only where the context and datastore have
        # nothing: a copy is free to make and, where one matches, often the better bet.
        drafted = self.draft_lookahead(state, greedy, [self.lookahead_always or not c for c in cands])
        # An adaptive greedy row gathers up to the kernel's limit and keeps the best max_nodes or fewer;
        # a sampled row keeps its first sampled_nodes (a fixed count: its tree may not depend on timings).
        built = [self.build(c, seq[-1], lm.takes_trees, d, MAX_TREE_NODES if adapt and g else
                            None if g else self.sampled_nodes)
                 for c, seq, d, g in zip(cands, state.seqs, drafted, greedy, strict=True)]
        if adapt:
            gains = [self.gains(t, placed, head) for t, placed, head in built]
            n = self.sizes(gains, greedy, self.cost_table(lm))
            pruned = [self.prune(t, placed, g, k) for (t, placed, _), g, k in zip(built, gains, n, strict=True)]
            built = [(t, placed, {new: head[old] for new, old in enumerate(order) if old in head})
                     for (t, placed, order), (_, _, head) in zip(pruned, built, strict=True)]
        trees = [t for t, _, _ in built]
        # --- one forward of all L layers over every row's tree ----------------------------------------
        ids, pos, masks = pack_trees(trees, roots, dev)  # (B, T) each; masks None: all chains
        self.cycles["chain" if masks is None else "tree"] += 1
        h = lm.embed(ids, pos)
        h = lm.run_layers(h, pos, cache, 0, L, ctx=lm.context(h, pos, tree=masks))  # (B, T, C)
        target = lm.logits(h)  # (B, T, V)
        verdict = verify_tree(target, trees, params)
        cache.keep_path(roots, verdict.paths)  # the accepted nodes to slots root + depth
        state.drop_rejected([len(p) - 1 for p in verdict.paths])
        if self.lookahead is not None:
            for b, ((_, _, head), path) in enumerate(zip(built, verdict.paths, strict=True)):
                self.hidden[b] = h[b, path[-1]].clone()  # what chose the pending token: the next drafts' input
                self.head_expected += sum(head.values())
                self.head_accepted += sum(node in head for node in path)
        for (_, placed, _), path in zip(built, verdict.paths, strict=True):
            for src, nodes in placed:
                if nodes:
                    agree = next((k for k, (a, b) in enumerate(zip(nodes, path[1:], strict=False)) if a != b),
                                 min(len(nodes), len(path) - 1))
                    self.tracker.update(src, len(nodes), agree)
        tokens = verdict.tokens(trees)
        return StepOutput(tokens=tokens, exit_layers=[[L] * len(t) for t in tokens],
                          layers_computed=[float(ids.shape[1] * L)] * B,
                          drafted=[len(t) - 1 for t in trees], accepted=[len(p) - 1 for p in verdict.paths])

    def describe(self) -> dict:
        return {"strategy": self.name, "depth": self.depth, "width": self.width, "max_nodes": self.max_nodes,
                "max_ngram": self.max_ngram, "adaptive": self.adaptive, "cycles": dict(self.cycles),
                "datastore_tokens": self.store.tokens if self.store else 0,
                "lookahead": None if self.lookahead is None else
                {"topk": self.lookahead.topk, "frontier": self.lookahead.frontier,
                 "accepted_per_expected": round(self.head_accepted / self.head_expected, 3)}}


def make_tree_lookup(model, depth: int = 4, width: int = 4, max_nodes: int = 16, max_ngram: int = 3,
                     datastore: bool | None = None, adaptive: bool = True, lookahead: bool = False,
                     lookahead_depth: int = 1, topk: int = 4, frontier: int = 2, lookahead_always: bool = True,
                     sampled_nodes: int | None = None) -> TreeLookup:
    """`lookahead`: draft from the bundle's lookahead head too (off by default: on the default model on a
    CPU its drafting cost more than its extra accepted tokens saved, benchmarks/unseen-lookahead), in
    every cycle, or with lookahead_always=false only where the context and datastore have no candidate;
    `lookahead_depth`, `topk` and `frontier`: its expansion (decoding/lookahead.py). `sampled_nodes`:
    the nodes a sampled row's tree keeps, its first ones in candidate order."""
    context = model.lm.max_positions
    if isinstance(depth, int) and depth >= context:
        raise StrategyOptionError(f"depth {depth} is deeper than the model's context ({context} positions): a "
                                  "path of d drafts needs d + 1 positions after the prompt; lower depth")
    bundle = model.heads
    store = bundle_store(bundle, model.lm.vocab_size) if bundle is not None and datastore is not False else None
    if datastore is True and store is None:
        raise StrategyOptionError("datastore=true needs a head bundle that keeps a draft corpus: attach "
                                  "--heads default or a bundle made by `exitspec train` with self_distill")
    if not isinstance(lookahead, bool):
        raise StrategyOptionError(f"lookahead must be true or false, got {lookahead!r}")
    head = getattr(bundle, "lookahead", None) if lookahead else None
    if lookahead and head is None:
        raise StrategyOptionError("lookahead=true needs a head bundle with a lookahead head: attach --heads default "
                                  "or train one with `exitspec train-lookahead`")
    if head is not None and isinstance(lookahead_depth, int) and isinstance(depth, int) and lookahead_depth > depth:
        raise StrategyOptionError(f"lookahead_depth {lookahead_depth} is deeper than the tree (depth {depth}); "
                                  "lower lookahead_depth or raise depth")
    try:
        drafter = None if head is None else \
            LookaheadDrafter(head, depth=lookahead_depth, topk=topk, frontier=frontier)
    except ValueError as err:
        raise StrategyOptionError(str(err)) from None
    return TreeLookup(depth=depth, width=width, max_nodes=max_nodes, max_ngram=max_ngram, store=store,
                      adaptive=adaptive, lookahead=drafter, lookahead_always=lookahead_always,
                      sampled_nodes=sampled_nodes)


register_strategy("tree", make_tree_lookup)
