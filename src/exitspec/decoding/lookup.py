"""Prompt lookup on the layered runtime: drafts copied from the row's own context, verified at once.

Drafting costs nothing here: the drafts are the tokens that followed the most recent earlier
occurrence of the row's last n tokens (prompt lookup decoding, Saxena 2023; HF's
`prompt_lookup_num_tokens`). A step then runs the pending token and the K drafts through all L
layers in ONE pass of K+1 rows and keeps the prefix the target agrees with (speculative.verify),
so greedy output equals vanilla's token for token and sampled output follows the model's own
distribution (the draft distribution q is one-hot at the copied token).

Why it pays on this runtime and not in HF's: a step of K+1 rows costs barely more than a step of
one while K+1 <= 4 (the int4 kernel dequantizes weights once per 4-row block; see models/int4.py),
so a proposal that is only partly right still comes out ahead, and a row with no match at all
pays only its one-row step. With dense `F.linear` a few-row step costs ~1.6x a one-row step, which
is why HF's prompt lookup runs below plain `generate` on this CPU.

Three sources, tried in this order for each row and step:
  1. the row's own context, n-grams of length max_ngram..2 (a long match there is the best evidence);
  2. the draft datastore (datastore.py): continuations the model most often produced after the same
     2..4 tokens in its own answers to the training prompts, kept in the head bundle
     (`exitspec train` stores its self-distilled answers; the shipped bundle has 1,770);
  3. the context again with a single matching token (min_ngram = 1), the weakest evidence.
A row with no proposal pays only its one-row step.

Measured (benchmarks/default, SmolLM2-135M int4, 2 cores): 3 drafts 1.49-1.76x the int4 vanilla
loop over three runs, 2 drafts 1.34x, 4 drafts 1.25x (a 5-row step crosses the int4 kernel's 4-row
block); without the datastore 1.2-1.5x.
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

    def survival(self, source: str) -> list[float]:
        """[P(draft 1 accepted), P(drafts 1..2 accepted), ...] up to `depth`."""
        hits = self.hits.get(source)
        out, p = [], 1.0
        for d in range(self.depth):
            rate = self.prior if hits is None else hits[d] / self.tries[source][d]
            p *= rate
            out.append(p)
        return out

    def length(self, source: str, available: int, min_accept: float) -> int:
        """How many of `available` drafts are worth a verification row each: the longest prefix
        whose last draft is accepted with probability >= min_accept, and at least one (the first
        draft of every source keeps being tried, so a source's rate can recover from a bad start)."""
        if min_accept <= 0:
            return available
        n = 1
        for p in self.survival(source)[1:available]:
            if p < min_accept:
                break
            n += 1
        return min(n, available)

    def update(self, source: str, proposed: int, accepted: int) -> None:
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

    def __init__(self, draft_len: int = 7, max_ngram: int = 3, min_ngram: int = 1, store: NgramStore | None = None,
                 min_accept: float = 0.25):
        if not isinstance(draft_len, int) or not 1 <= draft_len <= 64:
            raise StrategyOptionError(f"draft_len must be an integer in 1..64, got {draft_len!r}")
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram <= 16):
            raise StrategyOptionError(f"need integers 1 <= min_ngram ({min_ngram!r}) <= max_ngram ({max_ngram!r}) "
                                      "<= 16")
        if isinstance(min_accept, bool) or not isinstance(min_accept, (int, float)) or not 0 <= min_accept < 1:
            raise StrategyOptionError(f"min_accept must be a number in [0, 1) (0: always draft draft_len tokens), "
                                      f"got {min_accept!r}")
        self.gamma, self.min_ngram, self.max_ngram = draft_len, min_ngram, max_ngram
        self.store = store
        self.min_accept = float(min_accept)
        self.indexes: list[NgramIndex] = []
        self.tracker = AcceptanceTracker(draft_len)

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
        best, best_gain = ([], ""), -1.0
        for out, src in cands:
            cut = self.tracker.length(src, len(out), self.min_accept)
            gain = sum(self.tracker.survival(src)[:cut])
            if gain > best_gain:
                best, best_gain = (out[:cut], src), gain
        return best

    def extra_positions(self) -> int:
        return self.gamma + 1

    def prepare(self, state: DecodeState) -> None:
        self.indexes = [NgramIndex(self.min_ngram, self.max_ngram) for _ in state.seqs]
        self.tracker = AcceptanceTracker(self.gamma)

    def select_rows(self, keep: list[int]) -> None:
        self.indexes = [self.indexes[i] for i in keep]

    def step(self, state: DecodeState) -> StepOutput:
        lm, cache, params = state.lm, state.cache, state.params
        L, V = lm.num_layers, lm.vocab_size
        x, p0 = state.pending()  # (B, 1)
        B, dev = x.shape[0], x.device
        props, sources = [], []
        for ix, seq in zip(self.indexes, state.seqs, strict=True):
            out, src = self.propose(ix, seq)
            props.append(out)
            sources.append(src)
        K = max(len(p) for p in props)
        limit = torch.tensor([len(p) for p in props], dtype=torch.long)  # (B,) drafts per row
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
        v = verify(target, d, q, params, state.generator, limit=limit.to(dev))
        n = v.accepted.cpu()
        cache.rollback(p0[:, 0].cpu() + n + 1)  # drop rejected drafts and padding in every layer
        tokens = [d[b, :int(n[b])].tolist() + [int(v.next_token[b])] for b in range(B)]
        for src, prop, acc in zip(sources, props, n.tolist(), strict=True):
            if prop:
                self.tracker.update(src, len(prop), acc)
        return StepOutput(tokens=tokens, exit_layers=[[L] * len(t) for t in tokens],
                          layers_computed=[float((K + 1) * L)] * B, drafted=limit.tolist(), accepted=n.tolist())

    def describe(self) -> dict:
        return {"strategy": self.name, "draft_len": self.gamma, "max_ngram": self.max_ngram,
                "min_ngram": self.min_ngram, "min_accept": self.min_accept,
                "datastore_tokens": self.store.tokens if self.store else 0}


# One datastore per bundle, built on first use (~0.2 s for 220k tokens) and dropped with the bundle;
# rebuilt when the bundle's corpus tensor is replaced (set_draft_corpus).
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


def make_lookup(model, draft_len: int = 7, max_ngram: int = 3, min_ngram: int = 1, datastore=None,
                min_accept: float = 0.25, **unknown) -> Lookup:
    if unknown:
        raise StrategyOptionError(f"lookup has no option(s) {sorted(unknown)}; "
                                  "it takes draft_len, max_ngram, min_ngram, datastore, min_accept")
    if datastore is not None and not isinstance(datastore, bool):
        raise StrategyOptionError(f"datastore must be true or false (default: use the attached heads' corpus), "
                                  f"got {datastore!r}")
    bundle = getattr(model, "heads", None)
    store = bundle_store(bundle, model.lm.vocab_size) if bundle is not None and datastore is not False else None
    if datastore is True and store is None:
        raise StrategyOptionError("datastore=true needs a head bundle that keeps a draft corpus: attach "
                                  "--heads default or a bundle made by `exitspec train` with self_distill")
    return Lookup(draft_len=draft_len, max_ngram=max_ngram, min_ngram=min_ngram, store=store, min_accept=min_accept)


register_strategy("lookup", make_lookup)
