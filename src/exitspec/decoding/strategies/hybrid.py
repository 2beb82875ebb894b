"""Hybrid drafting: per row and cycle, drafts from the context / datastore, from an exit head, or none.

SEDAC's combination of n-gram and early-exit drafting, on the layered runtime. Each cycle, every row
weighs three ways to spend its next verification:

  lookup  the tokens that followed the latest earlier occurrence of its last n tokens, in its own
          context or the draft datastore (lookup.py's proposal, its first source that matches);
  head    up to draft_len tokens from an exit head at layer l, drafted as self-spec drafts them
          (self_spec.py: layers 0..l per draft, the kept layer-l states resume verification);
  none    no drafts: the pending token alone, one plain forward.

and takes the one with the most expected tokens per unit of cost, in forwards of the full model:

  lookup  (1 + S_src(k)) / 1                  drafting is free; its k+1 rows cost about a 1-row step
  head    (1 + S_head(k)) / (1 + k * c)       c = draft_cost: layers 0..l and the head, per draft
  none     1 / 1

where S(k) is the expected number of accepted drafts among k: the sum of the row's running survival
rates (lookup.AcceptanceTracker, one per row and source: how far that source's drafts got accepted
for this row so far; the head's prior is the bundle's held-out top-1 agreement at the exit where
training measured it). The head's cycle is (k+1) passes of layers 0..l + k heads + one pass of
layers l..L over k+1 rows = 1 + k*c forwards, hence its cost. c defaults to the weights a draft reads
over those a forward reads (draft_cost_estimate: a CPU decode step is bound by reading weights), so
on the default model's exit 24 of 30 a head draft costs most of a forward, and a row without a
context match only drafts from the head where the head's measured acceptance pays for that.
The estimate leaves out what a pass costs beyond its weights (a call's fixed overhead, attention over
the cache), so a timed cycle (`exitspec info --heads`, decoding/spec_costs.py) may show a draft
dearer than that: pass the timed figure as draft_cost. It is a fixed number rather than a timing so
that a seeded row's drafts, and so its output, are the same on every run. A row that chose none for
PROBE_EVERY cycles drafts one head token anyway: without it a head whose prior was too low would
never get the chance to show better.

Batches (continuous batching: rows come and go, engine.py). The choice is per row, and ONE
verification forward serves every row whichever source it drafted from: when any row drafts from
the head the cycle runs the head's shape for all rows (the drafting passes of layers 0..l feed each
row its own draft tokens, copied ones for lookup rows, the head's for head rows, padding past a
row's drafts; verification resumes every row at layer l), otherwise lookup's single pass of all
layers. Two batch rules, for greedy rows only: a head cycle that the batch's lookup and plain rows
would pay for more than its head rows bring (summed expected tokens per unit of cost) is dropped,
and when a head cycle runs anyway, greedy rows that would draft nothing draft from the head, whose
passes they ride along in already. A sampled row's drafts never depend on who shares its batch,
so a seeded row gives exactly its solo output (engine.py); greedy output equals vanilla's
whatever was drafted (speculative.verify). Not done here (lookup's fit_batch does it): cutting drafts
where a large batch's verification positions turn compute-bound, so that every position costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitspec.decoding.api import register_strategy
from exitspec.decoding.draft_vocab import DraftHead, draft_vocabulary
from exitspec.decoding.exits import StrategyOptionError, as_layers, default_exit_layers, exit_bundle
from exitspec.decoding.sampling import RowSampling
from exitspec.decoding.spec_costs import heldout_agreement
from exitspec.decoding.speculative import verify
from exitspec.decoding.strategies.lookup import AcceptanceTracker, Lookup, NgramIndex, bundle_store
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy
from exitspec.runtime.layered import LayeredModel

HEAD, NONE = "head", ""  # plan sources besides lookup's ("context3", "datastore2", ...)
PROBE_EVERY = 16  # cycles without head drafts after which a row that drafts nothing tries one
MAX_DRAFT = 64  # drafts per cycle, either source (as lookup and self-spec allow)


def draft_cost_estimate(lm: LayeredModel, drafter: DraftHead) -> float:
    """Forwards of the full model one head draft costs: the weights it reads (layers 0..l, the head's
    own parameters, its LM-head rows: the draft vocabulary's, or all) over the weights a forward reads
    (every layer and the LM head). A decode step on the CPU is bound by reading weights, so this is
    the shape of the cost; kernels that read an int4 layer and an int8 head at different bytes per
    weight move it somewhat (pass draft_cost to use a measured figure, e.g. decoding/spec_costs)."""
    counts = lm.param_counts()
    head = drafter.head
    skip = {id(head.head_weight())} | ({id(b)} if (b := head.head_bias()) is not None else set())
    own = sum(p.numel() for p in head.parameters() if id(p) not in skip)  # swiglu / block layers
    rows = lm.vocab_size if drafter.vocab is None else int(drafter.vocab.numel())
    full = lm.num_layers * counts["per_layer"] + lm.vocab_size * lm.hidden_size
    return (drafter.layer * counts["per_layer"] + own + rows * lm.hidden_size) / full


@dataclass
class RowDrafts:
    """What one row has learned about its sources."""

    index: NgramIndex  # its context's n-grams (lookup.py)
    lookup: AcceptanceTracker  # per lookup source
    head: AcceptanceTracker  # source HEAD
    idle: int = 0  # cycles since it last drafted from the head


@dataclass
class Plan:
    """One row's drafting this cycle."""

    source: str  # HEAD, a lookup source, or NONE
    drafts: list[int]  # lookup's copied tokens ([] for HEAD and NONE)
    k: int  # drafts to verify
    gain: float = 0.0  # expected accepted drafts
    probe: bool = False  # a head draft tried although it is not expected to pay (PROBE_EVERY)


class Hybrid(Strategy):
    name = "hybrid"
    lossless = True
    needs_heads = True

    def __init__(self, drafter: DraftHead, lookup: Lookup, num_layers: int, draft_len: int = 4,
                 draft_cost: float | None = None, head_prior: float = 0.5):
        if not isinstance(draft_len, int) or isinstance(draft_len, bool) or not 1 <= draft_len <= MAX_DRAFT:
            raise StrategyOptionError(f"draft_len (head drafts per cycle) must be an integer in 1..{MAX_DRAFT}, "
                                      f"got {draft_len!r}")
        if draft_cost is None:
            draft_cost = draft_cost_estimate(drafter.head.lm, drafter)
        if isinstance(draft_cost, bool) or not isinstance(draft_cost, (int, float)) or not 0 < draft_cost <= 2:
            raise StrategyOptionError(f"draft_cost (forwards one head draft costs) must be a number in (0, 2], got "
                                      f"{draft_cost!r}: a draft runs the layers below the exit and a head, about "
                                      "exit_layer / num_layers of a forward")
        if not 0 < head_prior < 1:
            raise StrategyOptionError(f"head_prior must be in (0, 1), got {head_prior!r}")
        self.drafter, self.lookup = drafter, lookup
        self.layer, self.num_layers = drafter.layer, num_layers
        self.gamma, self.cost, self.head_prior = draft_len, float(draft_cost), float(head_prior)
        self.rows: list[RowDrafts] = []
        # Cycles, drafts and accepted drafts per source over the strategy's life (what a run reports).
        self.usage = {src: {"cycles": 0, "drafted": 0, "accepted": 0} for src in ("lookup", HEAD, "none")}
        # Cycles by shape: lookup's one pass, the head's passes, and head cycles in which other rows copied.
        self.cycles = {"lookup": 0, HEAD: 0, "mixed": 0}

    # --- the engine's contract --------------------------------------------------------------------
    def extra_positions(self) -> int:
        return max(self.gamma, self.lookup.gamma) + 1  # drafts are written past the final token

    def keep_hidden_layer(self) -> int:
        return self.layer  # head cycles resume verification at the exit

    def head_cache_dtype(self) -> torch.dtype | None:
        return torch.float32 if self.drafter.head.contextual else None

    def new_row(self) -> RowDrafts:
        return RowDrafts(NgramIndex(self.lookup.min_ngram, self.lookup.max_ngram), AcceptanceTracker(self.lookup.gamma),
                         AcceptanceTracker(self.gamma, prior=self.head_prior))

    def prepare(self, state: DecodeState) -> None:
        self.rows = [self.new_row() for _ in state.seqs]

    def add_rows(self, state: DecodeState, n: int) -> None:
        self.rows += [self.new_row() for _ in range(n)]

    def select_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]

    # --- choosing -------------------------------------------------------------------------------------
    def head_plan(self, row: RowDrafts, k: int) -> Plan:
        return Plan(HEAD, [], k, sum(row.head.survival(HEAD)[:k]))

    def plan(self, row: RowDrafts, seq: list[int]) -> Plan:
        """The row's own choice: the most expected tokens per forward (module docstring). Ties go to
        the cheaper source: lookup, then none, then the head."""
        best, best_rate = Plan(NONE, [], 0), 1.0
        drafts, src = self.lookup.propose(row.index, seq)
        if drafts:
            gain = sum(row.lookup.survival(src)[:len(drafts)])
            if 1.0 + gain > best_rate:
                best, best_rate = Plan(src, drafts, len(drafts), gain), 1.0 + gain
        gain = 0.0
        for k, surv in enumerate(row.head.survival(HEAD), 1):
            gain += surv
            if (1.0 + gain) / (1.0 + k * self.cost) > best_rate:
                best, best_rate = Plan(HEAD, [], k, gain), (1.0 + gain) / (1.0 + k * self.cost)
        if best.source == NONE and row.idle >= PROBE_EVERY:
            best = self.head_plan(row, 1)
            best.probe = True
        return best

    def share_cycle(self, plans: list[Plan], greedy: list[bool]) -> list[Plan]:
        """The batch rules for greedy rows (module docstring). One cycle serves every row, so its cost
        is shared: a head cycle costs 1 + K_head * c forwards for the whole batch, a lookup cycle 1."""
        heads = [b for b, p in enumerate(plans) if p.source == HEAD]
        if not heads:
            return plans
        k = max(plans[b].k for b in heads)
        # Greedy rows with nothing to draft ride along in a head cycle: their layers 0..l run anyway.
        ride = [self.head_plan(self.rows[b], k) if p.source == NONE and greedy[b] else p for b, p in enumerate(plans)]
        if not all(greedy[b] and not plans[b].probe for b in heads):
            return ride  # a sampled row's head drafts stay, whoever shares its batch; so does a probe
        with_head = sum(1.0 + p.gain for p in ride) / (1.0 + k * self.cost)
        without = sum(1.0 + (0.0 if p.source == HEAD else p.gain) for p in plans)
        if without >= with_head:
            return [Plan(NONE, [], 0) if p.source == HEAD else p for p in plans]
        return ride

    # --- the step -------------------------------------------------------------------------------------
    def step(self, state: DecodeState) -> StepOutput:
        lm, params = state.lm, state.sampling
        L, E, V = lm.num_layers, self.layer, lm.vocab_size
        x, p0 = state.pending()  # (B, 1) each
        B, dev = x.shape[0], x.device
        plans = [self.plan(row, seq) for row, seq in zip(self.rows, state.seqs, strict=True)]
        plans = self.share_cycle(plans, [p.greedy for p in params.params])
        K = max(p.k for p in plans)
        drafted = [p.k for p in plans]
        limit = torch.tensor(drafted, dtype=torch.long, device=dev)  # (B,) drafts per row
        # Copied drafts in place, the rest padded with a repeated token (`limit` makes verify ignore it);
        # head rows' slots are overwritten as the head drafts.
        d = torch.tensor([p.drafts + [p.drafts[-1] if p.drafts else s[-1]] * (K - len(p.drafts))
                          for p, s in zip(plans, state.seqs, strict=True)], dtype=torch.long, device=dev).view(B, K)
        q = None if params.greedy else torch.zeros(B, K, V, device=dev)  # (B, K, V) what each draft was drawn from
        if q is not None:  # a copied token was "drawn" with probability 1 (padding too: never judged)
            q.scatter_(-1, d[..., None], 1.0)
        drafting = [b for b, p in enumerate(plans) if p.source == HEAD]
        if drafting:
            self.cycles[HEAD] += 1
            self.cycles["mixed"] += any(p.source not in (HEAD, NONE) for p in plans)
            h = self.head_cycle(state, x, p0, d, q, plans, drafting)  # (B, K+1, C) after all L layers
        else:
            self.cycles["lookup"] += 1
            h = self.lookup_cycle(state, x, p0, d)
        v = verify(lm.logits(h), d, q, params, limit=limit)
        # One host transfer each for the verdict and the drafts (the head wrote its rows' into d).
        accepted, nxt, drafts = v.accepted.tolist(), v.next_token.tolist(), d.tolist()
        state.drop_rejected(accepted)
        tokens, exits, layers = [], [], []
        extra_head = self.drafter.head.layers_run - E  # a block head's own layer (heads/block.py)
        for b, (row, p) in enumerate(zip(self.rows, plans, strict=True)):
            acc = accepted[b]
            tokens.append(drafts[b][:acc] + [nxt[b]])
            exits.append([E if p.source == HEAD else L] * acc + [L])
            layers.append(float((K + 1) * L + (p.k * extra_head if p.source == HEAD else 0)))
            self.record(row, p, acc)
        return StepOutput(tokens=tokens, exit_layers=exits, layers_computed=layers, drafted=drafted,
                          accepted=accepted, extra={"sources": [p.source or "none" for p in plans]})

    def lookup_cycle(self, state: DecodeState, x: torch.Tensor, p0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """No row drafts from the head: one pass of all L layers over the pending tokens and the copied
        drafts, as lookup runs it (B, K+1, C)."""
        lm, cache = state.lm, state.cache
        ids = torch.cat([x, d], 1)  # (B, K+1)
        pos = p0 + torch.arange(ids.shape[1], device=x.device)  # (B, K+1): each row at its own positions
        h = lm.embed(ids, pos)
        if not self.drafter.head.contextual:
            return lm.run_layers(h, pos, cache, 0, lm.num_layers)
        # A block head catches up on the positions it has not seen from the states kept at its exit
        # (heads/block.py), so those are kept here too; a position-wise head reads only its own cycle's.
        h = lm.run_layers(h, pos, cache, 0, self.layer)
        cache.keep_hidden(h, pos)
        return lm.run_layers(h, pos, cache, self.layer, lm.num_layers)

    def head_cycle(self, state: DecodeState, x: torch.Tensor, p0: torch.Tensor, d: torch.Tensor,
                   q: torch.Tensor | None, plans: list[Plan], drafting: list[int]) -> torch.Tensor:
        """Some rows draft from the head: K+1 passes of layers 0..l over every row (each fed its own
        next draft: the head's, a copied one, or padding), then one pass of layers l..L over the kept
        states of all K+1 positions (B, K+1, C). Fills the head rows' drafts into d and q."""
        lm, cache, params = state.lm, state.cache, state.sampling
        E, K, V = self.layer, d.shape[1], lm.vocab_size
        contextual = self.drafter.head.contextual
        feed = x  # (B, 1)
        for i in range(K + 1):
            pos = p0 + i  # (B, 1)
            h = lm.run_layers(lm.embed(feed, pos), pos, cache, 0, E)  # (B, 1, C)
            cache.keep_hidden(h, pos)
            if i == K:
                break
            rows = [b for b in drafting if i < plans[b].k]
            if rows:
                idx = torch.tensor(rows, device=x.device)
                # A block head attends over its own cache of every row; a position-wise head reads
                # only the drafting rows.
                # Only the drafting rows draw (each from its own generator): a lookup row's random
                # stream is what it would be alone.
                sub = RowSampling([params.params[b] for b in rows], [params.generators[b] for b in rows])
                with lm.clock:  # the head's draft is model work, as spec_costs.cycle_costs times it
                    logits = self.drafter.logits(h, pos, cache)[idx, -1] if contextual else \
                        self.drafter.logits(h[idx, -1])
                    tok, qd = self.drafter.choose(logits, sub, None, V)
                d[idx, i] = tok
                if q is not None:
                    q[idx, i] = qd if qd is not None else torch.zeros(len(rows), V, device=x.device).scatter_(
                        -1, tok[:, None], 1.0)  # greedy rows of a mixed batch: their draft, surely
            feed = d[:, i:i + 1]
        vpos = p0 + torch.arange(K + 1, device=x.device)  # (B, K+1)
        rows_all = torch.arange(d.shape[0], device=x.device)[:, None]
        return lm.run_layers(cache.hidden[rows_all, vpos], vpos, cache, E, lm.num_layers)

    def record(self, row: RowDrafts, p: Plan, accepted: int) -> None:
        if p.source == HEAD:
            row.head.update(HEAD, p.k, accepted)
            row.idle = 0
        else:
            row.idle += 1
            if p.source != NONE:
                row.lookup.update(p.source, p.k, accepted)
        u = self.usage[HEAD if p.source == HEAD else "lookup" if p.source else "none"]
        u["cycles"] += 1
        u["drafted"] += p.k
        u["accepted"] += accepted

    def describe(self) -> dict:
        return {"strategy": self.name, "exit_layer": self.layer, "draft_len": self.gamma,
                "lookup_len": self.lookup.gamma, "max_ngram": self.lookup.max_ngram,
                "min_ngram": self.lookup.min_ngram, "draft_cost": round(self.cost, 4),
                "draft_vocab": None if self.drafter.vocab is None else int(self.drafter.vocab.numel()),
                "datastore_tokens": self.lookup.store.tokens if self.lookup.store else 0}


def make_hybrid(model, exit_layer=None, draft_len: int | None = None, lookup_len: int = 3, max_ngram: int = 3,
                min_ngram: int = 1, datastore: bool | None = None, draft_vocab=None,
                draft_cost: float | None = None, **unknown) -> Hybrid:
    """Options: the exit and its drafts (exit_layer, draft_len, draft_vocab; default: the attached
    bundle's recommendation for self-spec, else the middle layer and 4), lookup's (lookup_len: copied
    drafts per cycle, max_ngram, min_ngram, datastore), and draft_cost (forwards per head draft,
    default: draft_cost_estimate)."""
    if unknown:
        raise StrategyOptionError(f"hybrid has no option(s) {sorted(unknown)}; it takes exit_layer, draft_len, "
                                  "lookup_len, max_ngram, min_ngram, datastore, draft_vocab, draft_cost")
    lm, bundle = model.lm, model.heads
    if exit_layer is None:
        # The exit self-spec drafts from is the one to draft from here, with its recommended drafts
        # (a recommended draft length belongs to its layer: naming a layer drops them, as for self-spec).
        exit_layer = default_exit_layers(model, "self-spec")[0]
        rec = bundle.config.recommended.get("self-spec", {}) if bundle is not None else {}
        if rec.get("exit_layer") == exit_layer:
            draft_len = rec.get("draft_len") if draft_len is None else draft_len
            draft_vocab = rec.get("draft_vocab") if draft_vocab is None else draft_vocab
    layers = as_layers(exit_layer)
    if len(layers) != 1:
        raise StrategyOptionError(f"hybrid drafts from one exit: pass one exit_layer, got {exit_layer!r}")
    layer = layers[0]
    draft_len = 4 if draft_len is None else draft_len
    if not isinstance(lookup_len, int) or isinstance(lookup_len, bool) or not 1 <= lookup_len <= MAX_DRAFT:
        raise StrategyOptionError(f"lookup_len (copied drafts per cycle) must be an integer in 1..{MAX_DRAFT}, "
                                  f"got {lookup_len!r}")
    if datastore is not None and not isinstance(datastore, bool):
        raise StrategyOptionError(f"datastore must be true or false (default: use the attached heads' corpus), "
                                  f"got {datastore!r}")
    heads = exit_bundle(model, [layer], contextual=True)  # checks 1 <= layer < num_layers
    store = bundle_store(bundle, lm.vocab_size) if bundle is not None and datastore is not False else None
    if datastore is True and store is None:
        raise StrategyOptionError("datastore=true needs a head bundle that keeps a draft corpus: attach "
                                  "--heads default or a bundle made by `exitspec train` with self_distill")
    lookup = Lookup(draft_len=lookup_len, max_ngram=max_ngram, min_ngram=min_ngram, store=store)
    vocab = draft_vocabulary(model, draft_vocab, heads) if draft_vocab else None
    agree = heldout_agreement(bundle, layer) if bundle is not None else None
    prior = min(max(agree, 0.05), 0.95) if agree is not None else 0.5  # a prior, never certainty either way
    return Hybrid(DraftHead(heads.head(layer), vocab), lookup, lm.num_layers, draft_len=draft_len,
                  draft_cost=draft_cost, head_prior=prior)


register_strategy("hybrid", make_hybrid)
