"""Tokens whose upper layers have not run yet, and the catch-up that runs them (deferred computation).

An early-exited token leaves the KV of the layers above its exit unwritten. Any later token that
runs such a layer must first see those entries, so before a token goes deeper, every earlier token
that stopped shallower is caught up *in the same call* (one run_layers over the tail of the
sequence, from the hidden states kept at the layer where each stopped). Every layer is then run
exactly once per token, and the cache ends up with exactly the entries the full model writes.

Invariant (what makes one call per segment enough): along a row's positions the computed depth
never increases — a token goes deeper only after every earlier token reached that depth. So the
tokens at the smallest depth are always a contiguous tail, and catching up is: run that tail from
its depth to the depth of the token before it (or the target), merge, repeat.

Depth is shared by all rows of a batch (a segment runs for the whole batch when any row needs it),
which keeps every call rectangular: entry i of every row sits at that row's own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitspec.runtime.kv_cache import KVCache
from exitspec.runtime.layered import LayeredModel


@dataclass
class Entry:
    pos: torch.Tensor  # (B, 1) position of this token in each row
    h: torch.Tensor  # (B, C) hidden state entering layer `depth` (the output of layer depth-1)
    depth: int  # layers 0..depth-1 have run for this token (their KV is in the cache)


class DeferredStack:
    def __init__(self, lm: LayeredModel, cache: KVCache):
        self.lm = lm
        self.cache = cache
        self.entries: list[Entry] = []
        self.token_layers = 0  # token-layers computed by catch-up calls (a cost counter)

    def push(self, h: torch.Tensor, pos: torch.Tensor, depth: int) -> None:
        """A new token that ran layers 0..depth-1; h (B, C), pos (B, 1)."""
        if self.entries and self.entries[-1].depth < depth:
            raise RuntimeError("a token may not run deeper than the tokens before it; advance them first")
        self.entries.append(Entry(pos, h, depth))

    @property
    def last(self) -> Entry:
        return self.entries[-1]

    def advance(self, to_layer: int) -> torch.Tensor:
        """Run the last token (and every earlier one behind it) up to `to_layer`; return its hidden (B, C)."""
        ents = self.entries
        while ents[-1].depth < to_layer:
            d = ents[-1].depth
            a = len(ents) - 1
            while a > 0 and ents[a - 1].depth == d:
                a -= 1
            stop = to_layer if a == 0 else min(ents[a - 1].depth, to_layer)
            tail = ents[a:]
            h = torch.stack([e.h for e in tail], 1)  # (B, T, C)
            pos = torch.cat([e.pos for e in tail], 1)  # (B, T)
            out = self.lm.run_layers(h, pos, self.cache, d, stop)
            for j, e in enumerate(tail):
                e.h, e.depth = out[:, j], stop
            self.token_layers += len(tail) * (stop - d)
        return ents[-1].h

    def drop_complete(self) -> None:
        """Forget the leading tokens that every layer has run for."""
        L = self.lm.num_layers
        k = 0
        while k < len(self.entries) and self.entries[k].depth >= L:
            k += 1
        del self.entries[:k]

    def select_rows(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.lm.device)
        for e in self.entries:
            e.pos, e.h = e.pos[idx], e.h[idx]

    def __len__(self) -> int:
        return len(self.entries)
