"""CascadeExit: each token is emitted by the shallowest exit that is confident, else by the full model.

Lossy by design: a confident exit's token is emitted without consulting the deeper layers. What
must stay right is the KV cache: a token that exited at layer e never ran layers e..L, yet later
tokens attend to its entries there. Two ways to fill them:

- deferred recomputation (default): keep the exited token's layer-e hidden state and run its
  skipped layers later, together with the next token that goes deeper (deferred.py). The entries
  are then exactly what the full model computes, so a later deep token sees an exact context; the
  skipped layers are batched into that token's pass (one call per segment, not one per token).
  `max_deferred` bounds the backlog: once a row has emitted that many tokens in a row from exits,
  its next token runs to the top (which runs every deferred token). Counted per row, from that row's
  own tokens only, so that when it is forced does not depend on the other rows of its batch.
- state propagation (`state_propagation=True`, CALM): feed the exit's hidden state to every
  skipped layer as if it were that layer's input and write the KV it yields. Cheaper bookkeeping,
  approximate entries. We run each skipped layer with skip_mlp on the exit state, which writes its
  KV (the output is discarded) at the price of one query's attention + output projection.

In a batch, a deeper segment runs when any row is not yet confident; each row still takes its
token from its own shallowest confident exit.

Each exit's gate is first tried over the 4096 most frequent tokens (`precheck_vocab`, see
exits.CheckedExit): the many tokens that are confident nowhere then skip the full LM head at every
exit. It can only send tokens deeper; on the default model (int4) it made cascade both faster and
better, lowering the perplexity of its outputs (benchmarks/README.md, 'Design measurements').

`exit_vocab` (N > 0; issue 20): every exit computes its logits over the N most frequent tokens only
(the bundle's token_frequencies, the ids precheck_vocab and draft_vocab use), its gate scores their
renormalised distribution, and a confident exit emits from it: an exited token never pays for the full
LM head, only N/V of one per exit tried (exits.CheckedExit). Tokens no exit takes use the full head as
without it. The bundle's calibrated thresholds were fitted to full-vocabulary scores, so they are used
only where the bundle stored them for the same exit_vocab; otherwise pass `threshold=`.

`adapt` (SEDAC's run-time adaptation, decoding/adapt.py): at the start of each request every exit's
threshold is moved by how much harder or easier the request's own prompt reads than the calibration
prompts did, with weight `adapt` (0 = off: the calibrated thresholds, exactly as without the option).
Each row of a batch gets its own thresholds, so with deferred recomputation (exact upper-layer
states) a row's tokens do not depend on the other rows of its batch.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from exitspec.decoding.adapt import (
    Adaptation,
    Reference,
    adaptation_option,
    adaptation_references,
    adaptation_targets,
    adapted_thresholds,
)
from exitspec.decoding.api import register_strategy
from exitspec.decoding.deferred import DeferredStack
from exitspec.decoding.draft_vocab import draft_vocabulary
from exitspec.decoding.exits import (
    CheckedExit,
    Gate,
    StrategyOptionError,
    attention_share,
    gate_counts,
    gated_exits,
    precheck_vocabulary,
)
from exitspec.decoding.sampling import sample
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy
from exitspec.heads.base import ExitHead


class Cascade(Strategy):
    name = "cascade"
    lossless = False
    needs_heads = True
    joinable = False  # the deferred stack's entries share one depth across rows (deferred.py)

    def __init__(self, heads: list[ExitHead], gates: dict[int, Gate], state_propagation: bool = False,
                 max_deferred: int = 16, precheck: torch.Tensor | None = None,
                 adaptation: Adaptation | None = None, targets: dict[int, float] | None = None,
                 references: dict[int, Reference | None] | None = None, exit_vocab: torch.Tensor | None = None):
        if not isinstance(max_deferred, int) or max_deferred < 1:
            raise StrategyOptionError(f"max_deferred must be a positive integer, got {max_deferred!r}")
        self.exits = [CheckedExit(h, gates[h.layer], precheck, exit_vocab)
                      for h in sorted(heads, key=lambda h: h.layer)]
        self.propagate = state_propagation
        self.max_deferred = max_deferred
        self.stack: DeferredStack | None = None
        self.adaptation, self.targets = adaptation, targets or {}
        self.references = references or {}  # per exit, the bundle's prompt reference (None: the blend)
        self.base_gates = dict(gates)  # the calibrated gates each request's adaptation starts from
        self.adapt_work: dict[str, float] = {}  # the adaptation passes' work so far (adapt.adapted_thresholds)
        self.run: torch.Tensor | None = None  # (B,) long: each row's tokens emitted from exits since its last deep one

    def prepare(self, state: DecodeState) -> None:
        self.stack = DeferredStack(state.lm, state.cache)
        self.run = torch.zeros(state.batch, dtype=torch.long)
        self.adapt_to(state.lm, state.seqs)

    def adapt_to(self, lm, prompts: list[list[int]]) -> None:
        """Every exit's thresholds adapted to `prompts`, one per row (decoding/adapt.py); nothing when
        adapt is off."""
        if self.adaptation is None:
            return
        values, work = adapted_thresholds(lm, self.exits, self.base_gates, self.targets, self.references, prompts,
                                          self.adaptation)
        for ex in self.exits:
            ex.gate = self.base_gates[ex.layer].with_rows(values[ex.layer])
        self.adapt_work = {k: self.adapt_work.get(k, 0.0) + v for k, v in work.items()}

    def cost_counts(self) -> dict[str, float]:
        """The gates' work so far in LM-head rows, and the adaptation passes' (bench/costs.py)."""
        return gate_counts(self.exits) | {f"adapt_{k}": v for k, v in self.adapt_work.items()}

    def select_rows(self, keep: list[int]) -> None:
        self.stack.select_rows(keep)
        self.run = self.run[keep]
        for ex in self.exits:  # each remaining row keeps its own adapted thresholds
            ex.gate = ex.gate.select_rows(keep)

    def step(self, state: DecodeState) -> StepOutput:
        lm, stack = state.lm, self.stack
        L = lm.num_layers
        x, pos = state.pending()  # (B, 1)
        B, dev = x.shape[0], x.device
        before = stack.token_layers
        first = self.exits[0].layer
        h = lm.run_layers(lm.embed(x, pos), pos, state.cache, 0, first)[:, -1]  # (B, C)
        stack.push(h, pos, first)
        tok = torch.zeros(B, dtype=torch.long, device=dev)
        layer_of = torch.full((B,), L, dtype=torch.long)
        decided = torch.zeros(B, dtype=torch.bool, device=dev)
        # A row with a full backlog of its own goes to the top, which also runs every deferred token.
        # Alone, a row's run is the stack's backlog; in a batch, other rows flush it sooner.
        forced = (self.run >= self.max_deferred).to(dev)
        for j, ex in enumerate(self.exits):
            if bool(forced.all()):
                break
            if j > 0:
                h = stack.advance(ex.layer)
            ok, logits = ex.confident(h, ~decided & ~forced)
            if logits is None:  # no row passed the pre-check
                continue
            tok = torch.where(ok, ex.token_ids(sample(logits, state.sampling)), tok)
            layer_of = torch.where(ok.cpu(), ex.layer, layer_of)
            decided |= ok
            if bool(decided.all()):
                break
        if not bool(decided.all()):
            h = stack.advance(L)
            tok = torch.where(decided, tok, sample(lm.logits(h[:, None])[:, 0], state.sampling))
        elif self.propagate:
            self._propagate(lm, state, stack.last)
        stack.drop_complete()
        if not self.propagate:  # (propagation completes every token at once: nothing is deferred)
            self.run = torch.where(layer_of < L, self.run + 1, 0)
        work = float(first + stack.token_layers - before)
        toks = tok.tolist()
        return StepOutput(tokens=[[t] for t in toks], exit_layers=[[int(e)] for e in layer_of],
                          layers_computed=[work] * B, extra={"deferred": len(stack)})

    def _propagate(self, lm, state: DecodeState, entry) -> None:
        """CALM: write the skipped layers' KV from the exit hidden state, then call the token complete."""
        h = entry.h[:, None]  # (B, 1, C)
        ctx = lm.context(h, entry.pos)
        for m in range(entry.depth, lm.num_layers):
            lm.run_layers(h, entry.pos, state.cache, m, m + 1, ctx=ctx, skip_mlp={m})
        # Attention (with its KV projections) ran, the MLPs did not.
        self.stack.token_layers += (lm.num_layers - entry.depth) * attention_share(lm)
        entry.depth = lm.num_layers

    def describe(self) -> dict:
        return {"strategy": self.name, "exit_layers": [e.layer for e in self.exits],
                "thresholds": {e.layer: (e.gate.score, e.gate.value) for e in self.exits},
                "state_propagation": self.propagate, "max_deferred": self.max_deferred,
                "precheck_vocab": self.exits[0].precheck_size,
                "exit_vocab": 0 if self.exits[0].vocab is None else int(self.exits[0].vocab.numel()),
                **({"adapt": self.adaptation.to_dict() | {"references": {
                    k: None if r is None else asdict(r) for k, r in self.references.items()}}}
                   if self.adaptation else {})}


def make_cascade(model, exit_layers=None, exit_layer=None, threshold=None, score: str | None = None,
                 state_propagation: bool = False, max_deferred: int = 16, precheck_vocab: int | list[int] = 4096,
                 adapt: float = 0.0, adapt_window: int | None = None, adapt_target: float | None = None,
                 exit_vocab: int = 0, **unknown) -> Cascade:
    """precheck_vocab: the frequent-token pre-check's size or token ids (exits.CheckedExit); 0 = off.
    adapt, adapt_window, adapt_target: per-request threshold adaptation (decoding/adapt.py); adapt=0 = off.
    exit_vocab: exits decide and emit over the N most frequent tokens, never the full head; 0 = off."""
    if unknown:
        raise StrategyOptionError(f"cascade has no option(s) {sorted(unknown)}; it takes exit_layers, threshold, "
                                  "score, state_propagation, max_deferred, precheck_vocab, adapt, adapt_window, "
                                  "adapt_target, exit_vocab")
    adaptation = adaptation_option("cascade", adapt, adapt_window, adapt_target)
    vocab_size = check_exit_vocab(model, exit_vocab)
    ex = gated_exits(model, "cascade", exit_layers, exit_layer, threshold, score, exit_vocab=vocab_size)
    vocab = exit_vocabulary(model, vocab_size, ex, adaptation)
    targets = refs = None
    if adaptation:
        targets = adaptation_targets(ex.bundle, ex.layers, adaptation, "cascade")
        refs = adaptation_references(ex.bundle, ex.gates, targets, adaptation, "cascade")
    return Cascade([ex.bundle.head(layer) for layer in ex.layers], ex.gates,
                   state_propagation=bool(state_propagation), max_deferred=max_deferred,
                   precheck=precheck_vocabulary(model, precheck_vocab, ex.bundle, "cascade"),
                   adaptation=adaptation, targets=targets, references=refs, exit_vocab=vocab)


def check_exit_vocab(model, exit_vocab) -> int:
    """The exit_vocab option -> N (0 = off), refused where it is not a token count the model has."""
    if isinstance(exit_vocab, bool) or not isinstance(exit_vocab, int) or exit_vocab < 0:
        raise StrategyOptionError(f"cascade: exit_vocab must be a number of tokens >= 0 (0 = off), got {exit_vocab!r}")
    V = model.lm.vocab_size
    if exit_vocab > V:
        raise StrategyOptionError(f"cascade: exit_vocab={exit_vocab} is larger than the model's vocabulary ({V}); "
                                  "pick N <= that, e.g. exit_vocab=4096")
    return exit_vocab


def exit_vocabulary(model, exit_vocab: int, ex, adaptation: Adaptation | None) -> torch.Tensor | None:
    """N -> (N,) token ids (the bundle's N most frequent, draft_vocab.py) or None (0 = off). The gates'
    thresholds were already checked to be meant for N-token scores (exits.gates_for)."""
    if exit_vocab == 0:
        return None
    if ex.bundle.config.training.get("token_frequencies") is None:
        raise StrategyOptionError("cascade: exit_vocab needs the head bundle's token frequency list "
                                  "(bundle.json training.token_frequencies) to pick the N most frequent tokens; "
                                  "attach a bundle that has one (--heads default) or pass exit_vocab=0")
    if adaptation is not None:
        raise StrategyOptionError("cascade: adapt shifts thresholds from the bundle's full-vocabulary prompt "
                                  "references, which do not hold for exit_vocab's scores; pass adapt=0 with exit_vocab")
    return draft_vocabulary(model, exit_vocab, ex.bundle)


register_strategy("cascade", make_cascade)
