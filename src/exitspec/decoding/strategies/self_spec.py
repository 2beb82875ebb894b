"""Self-speculative decoding (LayerSkip): draft with the first l layers + an exit head, verify with the rest.

One step, per row, with the pending token t0 at position p (see the invariant in strategy.py):

  draft   for i in 0..gamma: run layers 0..l on x_i at p+i (x_0 = t0, x_i = d_i), keep the layer-l
          hidden state in the cache, and (i < gamma) let the exit head propose d_{i+1}.
          Layers < l now hold KV for positions p..p+gamma.
  verify  ONE pass of layers l..L over the kept hidden states of positions p..p+gamma (gamma+1
          tokens). The drafts' layers < l are never recomputed: the verifier's layer l reads exactly
          the hidden states the drafting pass produced, which is what the full model would compute.
  accept  speculative.verify: n drafts kept, plus one correction / bonus token from the target.
  cache   positions p..p+n are right in every layer (t0 and the kept drafts); p+n+1.. hold rejected
          drafts in every layer, so all layers roll back to length p+n+1. The correction / bonus
          token becomes the new pending token: its layers < l and >= l run in the next step.

Greedy output equals vanilla's token for token; sampled output follows the model's own distribution.
Rows of a batch draft in lockstep (same gamma) at their own positions and keep different numbers of
drafts; the cache is position-indexed, so a per-row rollback is all the bookkeeping that takes.
"""

from __future__ import annotations

import torch

from exitspec.decoding.api import register_strategy
from exitspec.decoding.draft_vocab import DraftHead, draft_vocabulary
from exitspec.decoding.exits import StrategyOptionError, as_layers, default_exit_layers, exit_bundle
from exitspec.decoding.speculative import verify
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy


class SelfSpec(Strategy):
    name = "self-spec"
    lossless = True
    needs_heads = True

    def __init__(self, drafter: DraftHead, num_layers: int, draft_len: int = 4):
        if not isinstance(draft_len, int) or not 1 <= draft_len <= 64:
            raise StrategyOptionError(f"draft_len must be an integer in 1..64, got {draft_len!r}")
        self.drafter = drafter
        self.layer = drafter.layer
        self.gamma = draft_len
        self.num_layers = num_layers

    def extra_positions(self) -> int:
        return self.gamma + 1  # drafts are written past the final token before rollback

    def keep_hidden_layer(self) -> int:
        return self.layer

    def head_cache_dtype(self) -> torch.dtype | None:
        return torch.float32 if self.drafter.head.contextual else None

    def step(self, state: DecodeState) -> StepOutput:
        lm, cache, params = state.lm, state.cache, state.sampling
        L, E, K = lm.num_layers, self.layer, self.gamma  # E: the exit layer
        x, p0 = state.pending()  # (B, 1) each
        B = x.shape[0]
        drafts, qs = [], []
        # --- draft: gamma+1 passes of layers 0..l (the last one only to feed verification) ----
        for i in range(K + 1):
            pos = p0 + i  # (B, 1): each row at its own position
            h = lm.run_layers(lm.embed(x, pos), pos, cache, 0, E)  # (B, 1, C)
            cache.keep_hidden(h, pos)
            if i == K:
                break
            logits = self.drafter.logits(h, pos, cache)[:, -1] if self.drafter.head.contextual else \
                self.drafter.logits(h[:, -1])
            tok, q = self.drafter.choose(logits, params, None, lm.vocab_size)
            drafts.append(tok)
            qs.append(q)
            x = tok[:, None]
        # --- verify: layers l..L once, over the pending token and all drafts ----------------
        vpos = p0 + torch.arange(K + 1, device=p0.device)  # (B, K+1)
        rows = torch.arange(B, device=p0.device)[:, None]
        h = lm.run_layers(cache.hidden[rows, vpos], vpos, cache, E, L)  # (B, K+1, C)
        d = torch.stack(drafts, 1)  # (B, K)
        q = torch.stack(qs, 1) if not params.greedy else None  # (B, K, V)
        v = verify(lm.logits(h), d, q, params)
        # --- roll back the rejected drafts in every layer (per-row lengths) -------------------
        n = v.accepted.cpu()
        state.drop_rejected(n.tolist())
        tokens, exits = [], []
        for b in range(B):
            k = int(n[b])
            tokens.append(d[b, :k].tolist() + [int(v.next_token[b])])
            exits.append([E] * k + [L])
        # Every row ran (K+1) tokens through all L layers (0..l while drafting, l..L verifying), and
        # K drafts through the head's own layer where it has one (heads/block.py).
        layers = float((K + 1) * L + K * (self.drafter.head.layers_run - E))
        return StepOutput(tokens=tokens, exit_layers=exits, layers_computed=[layers] * B,
                          drafted=[K] * B, accepted=n.tolist())

    def describe(self) -> dict:
        return {"strategy": self.name, "exit_layer": self.layer, "draft_len": self.gamma,
                "draft_vocab": None if self.drafter.vocab is None else int(self.drafter.vocab.numel())}


def make_self_spec(model, exit_layer: int | None = None, draft_len: int = 4, draft_vocab=None,
                   **unknown) -> SelfSpec:
    if unknown:
        raise StrategyOptionError(f"self-spec has no option(s) {sorted(unknown)}; "
                                  "it takes exit_layer, draft_len, draft_vocab")
    layer = as_layers(exit_layer)[0] if exit_layer is not None else default_exit_layers(model, "self-spec")[0]
    bundle = exit_bundle(model, [layer], contextual=True)
    vocab = draft_vocabulary(model, draft_vocab, bundle) if draft_vocab else None
    return SelfSpec(DraftHead(bundle.head(layer), vocab), model.lm.num_layers, draft_len=draft_len)


register_strategy("self-spec", make_self_spec)
