"""Dynamic self-speculative decoding: confidence-gated drafting from one or several exits.

Like self-spec (see self_spec.py), but a row stops drafting as soon as no exit is confident about
its next draft, and each draft comes from the *shallowest* exit that is confident:

  for each draft position: run layers 0..e_1, ask exit e_1; not confident -> run e_1..e_2 on the same
  token (from the e_1 hidden state: nothing is recomputed) and ask e_2; ... no exit confident -> the
  row stops drafting here, and this position's target distribution supplies its next token.

A token that went deeper than the token before it first catches up the earlier, shallower tokens
(deferred.py), so every layer's KV is complete before anything attends to it, and the verification
pass is the same catch-up to layer L. Verification and rollback are self-spec's, so greedy output
equals vanilla's and sampled output follows the model's distribution (lossless).

The draft budget gamma adapts per row to recent acceptance (bounded by min_draft..max_draft): all
drafts accepted -> gamma + 2, a rejection -> gamma - 1 (the heuristic of HF's assisted generation).
In a batch, deeper exits run when any row needs them and drafting continues while any row drafts;
rows that stopped simply propose nothing more (their limit in the verifier).
"""

from __future__ import annotations

import torch

from exitspec.decoding.api import register_strategy
from exitspec.decoding.deferred import DeferredStack
from exitspec.decoding.draft_vocab import DraftHead, draft_vocabulary
from exitspec.decoding.exits import Gate, StrategyOptionError, gated_exits
from exitspec.decoding.speculative import verify
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy


class DSSD(Strategy):
    name = "dssd"
    lossless = True
    needs_heads = True

    def __init__(self, drafters: list[DraftHead], gates: dict[int, Gate], draft_len: int = 4,
                 min_draft: int = 1, max_draft: int = 8, adaptive: bool = True):
        if not 1 <= min_draft <= draft_len <= max_draft <= 64:
            raise StrategyOptionError(f"need 1 <= min_draft ({min_draft}) <= draft_len ({draft_len}) "
                                      f"<= max_draft ({max_draft}) <= 64")
        self.drafters = sorted(drafters, key=lambda d: d.layer)
        self.gates = gates
        self.start_gamma, self.min_draft, self.max_draft = draft_len, min_draft, max_draft
        self.adaptive = adaptive
        self.gamma: torch.Tensor | None = None  # (B,) per-row draft budget

    def extra_positions(self) -> int:
        return self.max_draft + 1

    def prepare(self, state: DecodeState) -> None:
        self.gamma = torch.full((state.batch,), self.start_gamma, dtype=torch.long)

    def select_rows(self, keep: list[int]) -> None:
        self.gamma = self.gamma[keep]

    def add_rows(self, state: DecodeState, n: int) -> None:
        self.gamma = torch.cat([self.gamma, torch.full((n,), self.start_gamma, dtype=torch.long)])

    def step(self, state: DecodeState) -> StepOutput:
        lm, cache, params = state.lm, state.cache, state.sampling
        L, V = lm.num_layers, lm.vocab_size
        x, p0 = state.pending()  # (B, 1)
        B, dev = x.shape[0], x.device
        first = self.drafters[0].layer
        stack = DeferredStack(lm, cache)
        drafting = torch.ones(B, dtype=torch.bool)  # rows still proposing drafts
        limit = torch.zeros(B, dtype=torch.long)  # drafts proposed per row
        drafts, qs, exit_of = [], [], []
        gamma = self.gamma
        for i in range(int(gamma.max()) + 1):
            pos = p0 + i
            h = lm.run_layers(lm.embed(x, pos), pos, cache, 0, first)[:, -1]  # (B, C)
            stack.push(h, pos, first)
            drafting &= i < gamma
            if not drafting.any():
                break  # this entry only feeds verification (its target gives the next token)
            tok = torch.zeros(B, dtype=torch.long, device=dev)
            q = None if params.greedy else torch.zeros(B, V, device=dev)
            layer_of = torch.full((B,), L, dtype=torch.long)
            decided = ~drafting.to(dev)
            for j, dh in enumerate(self.drafters):
                if j > 0:
                    h = stack.advance(dh.layer)  # catch up shallower tokens, then run e_{j-1}..e_j
                gate = self.gates[dh.layer]
                if not gate.needs_logits:  # a hidden-state gate: skip this head where no row drafts from it
                    ok = gate.passes(None, h) & ~decided
                    if not bool(ok.any()):
                        continue
                logits = dh.logits(h)  # (B, N)
                t, qd = dh.choose(logits, params, None, V)
                if gate.needs_logits:
                    ok = gate.passes(logits, h) & ~decided
                # Rows no exit is sure about still get a (never proposed) filler token to keep shapes.
                fill = ok | (j == 0)
                tok = torch.where(fill, t, tok)
                if q is not None:
                    q = torch.where(fill[:, None], qd, q)
                layer_of = torch.where(ok.cpu(), dh.layer, layer_of)
                decided |= ok
                if bool(decided.all()):
                    break
            drafting &= decided.cpu()  # unconfident rows stop drafting at this position
            if not drafting.any():
                break  # nobody drafts here: this entry's target gives every row its next token
            limit += drafting.long()
            drafts.append(tok)
            qs.append(q)
            exit_of.append(layer_of)
            x = tok[:, None]
        # --- verify: catch every token up to L, then self-spec's rule and rollback ------------
        stack.advance(L)
        k = len(drafts)
        target = lm.logits(torch.stack([e.h for e in stack.entries], 1))  # (B, k+1, V)
        d = torch.stack(drafts, 1) if k else torch.zeros(B, 0, dtype=torch.long, device=dev)
        qd = torch.stack(qs, 1) if k and not params.greedy else (None if params.greedy else target.new_zeros(B, 0, V))
        v = verify(target, d, qd, params, limit=limit.to(dev))
        n = v.accepted.cpu()
        state.drop_rejected(n.tolist())
        if self.adaptive:
            full = (n == limit) & (limit == gamma)
            self.gamma = torch.where(full, gamma + 2, gamma - (n < limit).long()).clamp(self.min_draft, self.max_draft)
        layers = torch.stack(exit_of, 1) if k else torch.zeros(B, 0, dtype=torch.long)
        tokens, exits = [], []
        for b in range(B):
            m = int(n[b])
            tokens.append(d[b, :m].tolist() + [int(v.next_token[b])])
            exits.append(layers[b, :m].tolist() + [L])
        work = float(first * len(stack) + stack.token_layers)  # token-layers this step, per row
        return StepOutput(tokens=tokens, exit_layers=exits, layers_computed=[work] * B,
                          drafted=limit.tolist(), accepted=n.tolist())

    def describe(self) -> dict:
        return {"strategy": self.name, "exit_layers": [d.layer for d in self.drafters],
                "thresholds": {k: (g.score, g.value) for k, g in self.gates.items()},
                "draft_len": self.start_gamma, "max_draft": self.max_draft, "adaptive": self.adaptive}


def make_dssd(model, exit_layers=None, exit_layer=None, draft_len: int = 4, min_draft: int = 1, max_draft: int = 8,
              adaptive: bool = True, threshold=None, score: str | None = None, draft_vocab=None, **unknown) -> DSSD:
    if unknown:
        raise StrategyOptionError(f"dssd has no option(s) {sorted(unknown)}; it takes exit_layers, draft_len, "
                                  "min_draft, max_draft, adaptive, threshold, score, draft_vocab")
    ex = gated_exits(model, "dssd", exit_layers, exit_layer, threshold, score)
    vocab = draft_vocabulary(model, draft_vocab, ex.bundle) if draft_vocab else None
    drafters = [DraftHead(ex.bundle.head(layer), vocab) for layer in ex.layers]
    return DSSD(drafters, ex.gates, draft_len=draft_len, min_draft=min_draft, max_draft=max_draft,
                adaptive=bool(adaptive))


register_strategy("dssd", make_dssd)
