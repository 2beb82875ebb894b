"""Prompt lookup on the layered runtime: drafts copied from the row's own context, verified at once.

Drafting costs nothing here: the drafts are the tokens that followed the most recent earlier
occurrence of the row's last n tokens (prompt lookup decoding, Saxena 2023; HF's
`prompt_lookup_num_tokens`). A step then runs the pending token and the K drafts through all L
layers in ONE pass of K+1 rows and keeps the prefix the target agrees with (speculative.verify),
so greedy output equals vanilla's token for token and sampled output follows the model's own
distribution (the draft distribution q is one-hot at the copied token).

Why it pays on this runtime and not in HF's: with exitspec's int4 kernels a step of K+1 rows costs
barely more than a step of one while K+1 <= 4 (kernels/csrc/gemm.cpp: the weights are read once for
all rows and a 1-row step is bound by memory), so a proposal that is only partly right still comes
out ahead, and a row with no match at all pays only its one-row step. With dense `F.linear` a
few-row step costs clearly more than a one-row step (MKL's few-row gemm, models/ops.linear), which
is why HF's prompt lookup ran below plain `generate` in the CPU runs measured.

Three sources for each row and step:
  1. the row's own context, n-grams of length max_ngram..2 (a long match there is the best evidence);
     a match close to the end repeats with its period, LZ77-style (NgramIndex.propose);
  2. the draft datastore (datastore.py): continuations the model most often produced after the same
     2..4 tokens in its own answers to the training prompts, kept in the head bundle
     (`exitspec train` stores its self-distilled answers, `exitspec datastore` rebuilds them from more
     prompts; the shipped bundle holds the int4 model's answers to 5,869 train prompts, 735k tokens);
  3. the context again with a single matching token (min_ngram = 1), the weakest evidence.
By default the first that proposes anything wins and gives up to draft_len tokens. `adaptive=True`
instead learns how far each source's drafts get accepted (AcceptanceTracker), picks the candidate
with the most expected accepted drafts and cuts it where a further verification row (priced by the
runtime's measured row-cost curve, runtime/profile.row_costs) would cost more than it is expected to
bring. That won where rows are dear (torch's int4 kernel) and loses a little where 4 rows cost
about as much as 1 (the fused kernels), hence off. On the fused kernels 3 fixed drafts (the default)
beat 4, whose 5-row step already costs clearly more than a 1-row one, and adaptive drafting with up
to 7 (speedups by machine: benchmarks/README.md, 'Design measurements' and 'Run history').
"""

from __future__ import annotations

import weakref

import torch

from exitspec.decoding.api import register_strategy
from exitspec.decoding.datastore import NgramStore
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.speculative import verify
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy
from exitspec.heads.bundle import BundleError
from exitspec.runtime.profile import interpolate_cost, position_costs, row_costs

BATCH_POSITIONS = 128  # positions the batch cost table is measured up to (32 rows x 4); linear beyond


class NgramIndex:
    """Where each n-gram of one growing token sequence last occurred, updated incrementally.

    index[n][gram] = j means seq[j-n:j] == gram and seq[j] exists (the copy starts at j). Only
    positions with a continuation are indexed, so the row's own final n-gram never matches itself.
    """

    def __init__(self, min_n: int, max_n: int):
        self.ns = range(max_n, min_n - 1, -1)  # longest first: a longer match predicts better
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ns}
        self.seen = 0  # continuation positions j < seen are indexed

    def update(self, seq: list[int]) -> None:
        for j in range(max(self.seen, 1), len(seq)):
            for n in self.ns:
                if j >= n:
                    self.index[n][tuple(seq[j - n:j])] = j  # later occurrences overwrite: most recent wins
        self.seen = max(self.seen, len(seq))

    def propose(self, seq: list[int], k: int, min_n: int = 1) -> tuple[list[int], int]:
        """Up to k tokens that followed the latest earlier occurrence of seq's longest matching
        suffix of at least min_n tokens, and that suffix's length ([], 0 if none).

        The copy may run past the end of seq, LZ77-style: a match `dist` tokens back predicts that
        the text repeats with period `dist`, so token i of the copy is seq[j + i] while that exists and
        the copy's own token i - dist after (a greedy loop of period 2 then still gets k drafts)."""
        self.update(seq)
        for n in self.ns:
            if n >= min_n and len(seq) > n and (j := self.index[n].get(tuple(seq[-n:]))) is not None:
                dist = len(seq) - j
                out = seq[j:j + k]
                while len(out) < k:
                    out.append(out[len(out) - dist])
                return out, n
        return [], 0


class AcceptanceTracker:
    """How far drafts from each source get accepted, learned while decoding.

    For a source (say "context, 3-gram match") and depth d, rate[d] = how often the d-th draft was
    accepted when the d-1 before it were; survival(d) = the product of those rates up to d, the
    chance that the d-th draft is accepted. Measured on the default model (20 held-out prompts, 7
    drafts), survival at d = 1 / 2 / 4 / 7 was 0.80 / 0.63 / 0.47 / 0.21 for a 3-gram context match
    but 0.30 / 0.12 / 0.02 / 0.00 for a 2-gram datastore match: one fixed draft length wastes rows on
    weak proposals and stops strong ones early. Each source starts from a neutral prior (rate 0.5,
    worth two observations) and follows what it sees."""

    def __init__(self, depth: int, prior: float = 0.5, weight: float = 2.0):
        self.depth, self.prior, self.weight = depth, prior, weight
        self.hits: dict[str, list[float]] = {}
        self.tries: dict[str, list[float]] = {}
        # survival() per source until its next update: a cycle reads it several times per candidate
        # (length, the net gain, a batch's fit), and recomputing the product each time was host work
        # of every cycle. Callers read the lists, never change them.
        self._survival: dict[str, list[float]] = {}

    def survival(self, source: str) -> list[float]:
        """[P(draft 1 accepted), P(drafts 1..2 accepted), ...] up to `depth`."""
        cached = self._survival.get(source)
        if cached is not None:
            return cached
        hits = self.hits.get(source)
        out, p = [], 1.0
        for d in range(self.depth):
            rate = self.prior if hits is None else hits[d] / self.tries[source][d]
            p *= rate
            out.append(p)
        self._survival[source] = out
        return out

    def length(self, source: str, available: int, costs: list[float], rate: float) -> int:
        """The number of drafts (1..available) with the most expected accepted drafts net of what
        their verification rows cost: max over k of sum(survival[:k]) - rate * (costs[k] - 1), with
        costs[k] the cost of a (k+1)-row step in 1-row steps and `rate` the tokens a 1-row step's
        worth of time yields so far. At least one draft: a source keeps being tried, so its rate can
        recover from a bad start."""
        surv = self.survival(source)
        best, best_k, gain = float("-inf"), 1, 0.0
        for k in range(1, available + 1):
            gain += surv[k - 1]
            net = gain - rate * (costs[k] - 1.0)
            if net > best:
                best, best_k = net, k
        return best_k

    def update(self, source: str, proposed: int, accepted: int) -> None:
        self._survival.pop(source, None)
        if source not in self.hits:
            self.hits[source] = [self.prior * self.weight] * self.depth
            self.tries[source] = [self.weight] * self.depth
        hits, tries = self.hits[source], self.tries[source]
        for d in range(min(accepted + 1, proposed)):  # draft d+1 was judged: all before it were accepted
            tries[d] += 1
            if d < accepted:
                hits[d] += 1


class Lookup(Strategy):
    name = "lookup"
    lossless = True

    def __init__(self, draft_len: int = 3, max_ngram: int = 3, min_ngram: int = 1, store: NgramStore | None = None,
                 adaptive: bool = False):
        if not isinstance(draft_len, int) or not 1 <= draft_len <= 64:
            raise StrategyOptionError(f"draft_len must be an integer in 1..64, got {draft_len!r}")
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram <= 16):
            raise StrategyOptionError(f"need integers 1 <= min_ngram ({min_ngram!r}) <= max_ngram ({max_ngram!r}) "
                                      "<= 16")
        if not isinstance(adaptive, bool):
            raise StrategyOptionError(f"adaptive must be true or false, got {adaptive!r}")
        self.gamma, self.min_ngram, self.max_ngram = draft_len, min_ngram, max_ngram
        self.store = store
        self.adaptive = adaptive
        self.indexes: list[NgramIndex] = []
        self.tracker = AcceptanceTracker(draft_len)
        self.costs = [1.0] * (draft_len + 1)  # (k+1)-row step / 1-row step; see use_row_costs()
        self.tokens = self.spent = 0.0  # emitted tokens and the steps' cost so far, in 1-row steps

    def propose(self, index: NgramIndex, seq: list[int]) -> tuple[list[int], str]:
        """A row's drafts, cut to the length worth verifying, and the source they came from ("" for
        none). Candidates: the longest context match of >= 2 tokens, the datastore's longest match,
        a 1-token context match; the one with the most expected accepted drafts wins (a 3-gram
        context match usually beats the datastore, a 2-gram one often does not)."""
        k, cands = self.gamma, []
        out, n = index.propose(seq, k, min_n=2)
        if out:
            cands.append((out, f"context{n}"))
        if self.store is not None:
            out, n = self.store.propose(seq, k)
            if out:
                cands.append((out, f"datastore{n}"))
        if not cands and self.min_ngram == 1:
            out, n = index.propose(seq, k, min_n=1)
            if out:
                cands.append((out, "context1"))
        if not self.adaptive:
            return cands[0] if cands else ([], "")
        rate = max(1.0, self.tokens / self.spent) if self.spent else 1.0
        best, best_net = ([], ""), float("-inf")
        for out, src in cands:
            cut = self.tracker.length(src, len(out), self.costs, rate)
            net = sum(self.tracker.survival(src)[:cut]) - rate * (self.costs[cut] - 1.0)
            if net > best_net:
                best, best_net = (out[:cut], src), net
        return best

    def extra_positions(self) -> int:
        return self.gamma + 1

    def prepare(self, state: DecodeState) -> None:
        self.indexes = [NgramIndex(self.min_ngram, self.max_ngram) for _ in state.seqs]
        self.tracker = AcceptanceTracker(self.gamma)
        self.tokens = self.spent = 0.0

    def use_row_costs(self, costs: list[float]) -> None:
        """The runtime's measured (k+1)-row step costs for k = 0..draft_len, in 1-row steps: what
        adaptive drafting weighs a longer draft's expected gain against."""
        if len(costs) < self.gamma + 1:
            raise ValueError(f"need the costs of 1..{self.gamma + 1}-row steps, got {len(costs)}")
        self.costs = list(costs[: self.gamma + 1])

    def select_rows(self, keep: list[int]) -> None:
        self.indexes = [self.indexes[i] for i in keep]

    def add_rows(self, state: DecodeState, n: int) -> None:
        self.indexes += [NgramIndex(self.min_ngram, self.max_ngram) for _ in range(n)]

    def step(self, state: DecodeState) -> StepOutput:
        lm, cache, params = state.lm, state.cache, state.sampling
        L, V = lm.num_layers, lm.vocab_size
        x, p0 = state.pending()  # (B, 1)
        B, dev = x.shape[0], x.device
        props, sources = [], []
        for ix, seq in zip(self.indexes, state.seqs, strict=True):
            out, src = self.propose(ix, seq)
            props.append(out)
            sources.append(src)
        if B > 1:
            props = self.fit_batch(position_costs(lm, BATCH_POSITIONS), props, sources,
                                   [p.greedy for p in params.params])
        K = max(len(p) for p in props)
        drafted = [len(p) for p in props]
        limit = torch.tensor(drafted, dtype=torch.long, device=dev)  # (B,) drafts per row
        # Shorter proposals are padded by repeating a token; `limit` makes the verifier ignore the padding.
        d = torch.tensor([p + [p[-1] if p else s[-1]] * (K - len(p)) for p, s in zip(props, state.seqs, strict=True)],
                         dtype=torch.long, device=dev).view(B, K)  # (B, K)
        # --- one pass of all L layers over the pending token and the drafts ---------------------
        ids = torch.cat([x, d], 1)  # (B, K+1)
        pos = p0 + torch.arange(K + 1, device=dev)  # (B, K+1): each row at its own positions
        target = lm.logits(lm.run_layers(lm.embed(ids, pos), pos, cache, 0, L))  # (B, K+1, V)
        q = None
        if not params.greedy:  # the copied token was "drawn" with probability 1
            q = torch.zeros(B, K, V, device=dev).scatter_(-1, d[..., None], 1.0)  # (B, K, V)
        v = verify(target, d, q, params, limit=limit)
        # One host transfer each for the verdict; the kept drafts are the row's own proposal's prefix
        # (accepted <= limit), so the tokens come from the Python lists, not from indexing d row by row.
        accepted, nxt = v.accepted.tolist(), v.next_token.tolist()
        state.drop_rejected(accepted)
        tokens = [p[:a] + [t] for p, a, t in zip(props, accepted, nxt, strict=True)]
        for src, prop, acc in zip(sources, props, accepted, strict=True):
            if prop:
                self.tracker.update(src, len(prop), acc)
        self.tokens += sum(len(t) for t in tokens) / B
        self.spent += self.costs[min(K, len(self.costs) - 1)]
        return StepOutput(tokens=tokens, exit_layers=[[L] * len(t) for t in tokens],
                          layers_computed=[float((K + 1) * L)] * B, drafted=drafted, accepted=accepted)

    def warm_up(self, lm, max_rows: int) -> None:
        if max_rows > 1:
            position_costs(lm, BATCH_POSITIONS)  # kept per runtime: the batched steps read it

    def fit_batch(self, costs: dict[int, float], props: list[list[int]], sources: list[str],
                  greedy: list[bool]) -> list[list[int]]:
        """Cut the greedy rows' drafts to the length K that makes the most tokens per unit of time
        for the whole batch.

        Why: a step verifies B x (K+1) positions (shorter proposals are padded to the longest). One
        row's 4 positions cost barely more than 1, but many rows' positions together are
        compute-bound: each drafted position then costs as much as a row of its own, more than a
        draft brings at lookup's acceptance, so under load plain steps give more throughput (the
        same reason vLLM turns speculation off past a batch size). K maximises the sum over rows of
        (1 + expected accepted drafts) / cost(B x (K+1)): the expected accepted drafts from each
        source's running survival rates (AcceptanceTracker), the cost from the runtime's measured
        position-cost table (`costs`, runtime/profile.position_costs). Sampled rows keep their
        drafts, and K never goes below their longest: a seeded sampled row's draws depend on what
        was drafted, and it must give exactly its solo output whoever shares the batch (engine.py)."""
        longest = max(len(p) for p in props)
        floor = max((len(p) for p, g in zip(props, greedy, strict=True) if not g), default=0)
        if longest <= floor:
            return props
        B = len(props)
        surv = {src: self.tracker.survival(src) for src in set(sources)}
        best_k, best = longest, -1.0
        for k in range(floor, longest + 1):
            tokens = sum(1.0 + sum(surv[src][:min(k, len(p))]) for p, src in zip(props, sources, strict=True))
            rate = tokens / interpolate_cost(costs, B * (k + 1))
            if rate > best:
                best_k, best = k, rate
        return [p[:best_k] if g else p for p, g in zip(props, greedy, strict=True)]

    def describe(self) -> dict:
        return {"strategy": self.name, "draft_len": self.gamma, "max_ngram": self.max_ngram,
                "min_ngram": self.min_ngram, "adaptive": self.adaptive,
                "datastore_tokens": self.store.tokens if self.store else 0}


# One datastore per bundle, built on first use (too slow to rebuild per generate call) and dropped
# with the bundle; rebuilt when the bundle's corpus tensor is replaced (set_draft_corpus).
_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bundle_store(bundle, vocab_size: int) -> NgramStore | None:
    """The draft datastore of a head bundle's stored corpus (None when it keeps none)."""
    corpus = getattr(bundle, "draft_corpus", None)
    cached = _STORES.get(bundle)
    if cached is None or cached[0] is not corpus:
        try:  # the bundle's flat corpus is already the store's layout: no split into lists and back
            store = NgramStore(corpus.cpu().numpy(), vocab_size) if corpus is not None and len(corpus) else None
        except ValueError as err:
            raise BundleError(f"the head bundle's draft corpus is damaged ({err}); re-save or retrain the "
                              "bundle, or pass datastore=false") from err
        _STORES[bundle] = cached = (corpus, store)
    return cached[1]


def make_lookup(model, draft_len: int = 3, max_ngram: int = 3, min_ngram: int = 1, datastore=None,
                adaptive: bool = False, **unknown) -> Lookup:
    if unknown:
        raise StrategyOptionError(f"lookup has no option(s) {sorted(unknown)}; "
                                  "it takes draft_len, max_ngram, min_ngram, datastore, adaptive")
    if datastore is not None and not isinstance(datastore, bool):
        raise StrategyOptionError(f"datastore must be true or false (default: use the attached heads' corpus), "
                                  f"got {datastore!r}")
    bundle = model.heads
    store = bundle_store(bundle, model.lm.vocab_size) if bundle is not None and datastore is not False else None
    if datastore is True and store is None:
        raise StrategyOptionError("datastore=true needs a head bundle that keeps a draft corpus: attach "
                                  "--heads default or a bundle made by `exitspec train` with self_distill")
    lookup = Lookup(draft_len=draft_len, max_ngram=max_ngram, min_ngram=min_ngram, store=store, adaptive=adaptive)
    if adaptive:
        lookup.use_row_costs(row_costs(model.lm, lookup.gamma + 1))
    return lookup


register_strategy("lookup", make_lookup)
