"""Vanilla decoding: one full forward per token. The reference every other strategy is checked against."""

from __future__ import annotations

from exitspec.decoding.sampling import sample
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy


class Vanilla(Strategy):
    name = "vanilla"
    lossless = True

    def step(self, state: DecodeState) -> StepOutput:
        lm = state.lm
        ids, pos = state.pending()  # (B, 1)
        h = lm.run_layers(lm.embed(ids, pos), pos, state.cache, 0, lm.num_layers)
        logits = lm.logits(h[:, -1])  # (B, V)
        nxt = sample(logits, state.sampling).tolist()
        L = lm.num_layers
        return StepOutput(tokens=[[t] for t in nxt], exit_layers=[[L] for _ in nxt],
                          layers_computed=[float(L)] * len(nxt))
