"""The contract between the decode driver and a decoding strategy.

Invariant shared by every strategy (it is what makes them composable and lossless-checkable):
for each active row, the KV cache of *every* layer holds positions 0 .. len(seq)-2, and the last
token of `seq` is *pending*: chosen but not yet run through the model. A step runs the pending
token (plus whatever it drafts), and returns one or more new tokens per row; the last one returned
becomes the new pending token. The engine (engine.py) appends tokens, applies stop rules, streams
text, drops finished rows (`select_rows`) and, between steps, appends newly prefilled rows at the
end of the batch (`add_rows`): rows come and go while the batch runs (continuous batching).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from exitspec.decoding.sampling import RowSampling
from exitspec.runtime.kv_cache import KVCache
from exitspec.runtime.layered import LayeredModel


@dataclass
class DecodeState:
    lm: LayeredModel
    cache: KVCache
    seqs: list[list[int]]  # active rows: prompt + generated tokens; the last one is pending
    sampling: RowSampling  # each active row's settings and generator (sampling.py)
    heads: object | None = None  # an exit-head bundle, for strategies that use one

    @property
    def batch(self) -> int:
        return len(self.seqs)

    def pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pending tokens (B, 1) and their positions (B, 1)."""
        dev = self.lm.device
        ids = torch.tensor([[s[-1]] for s in self.seqs], device=dev)
        pos = torch.tensor([[len(s) - 1] for s in self.seqs], device=dev)
        return ids, pos

    def drop_rejected(self, accepted: Sequence[int]) -> None:
        """After a verification: every layer's cache keeps, per row, its pending token (slot len - 1) and
        the row's `accepted` drafts after it; the rejected drafts and any padding are rolled back."""
        self.cache.rollback(torch.tensor([len(s) + a for s, a in zip(self.seqs, accepted, strict=True)]))

    def filled(self) -> torch.Tensor:
        """(B,) number of positions every layer's cache must hold at the start of a step."""
        return torch.tensor([len(s) - 1 for s in self.seqs])


@dataclass
class StepOutput:
    tokens: list[list[int]]  # per active row, >= 1 new tokens; the last becomes pending
    exit_layers: list[list[int]]  # per row, per token: the layer whose output chose it
    layers_computed: list[float]  # per row: decoder layers run this step (summed over tokens)
    drafted: list[int] | None = None  # per row: draft tokens proposed (speculative strategies)
    accepted: list[int] | None = None  # per row: draft tokens accepted
    extra: dict = field(default_factory=dict)


class Strategy(ABC):
    name: str = ""
    lossless: bool = False  # greedy output equals vanilla's token for token
    # Rows may join a running batch (add_rows). False for a strategy whose state cannot take a new
    # row mid-run (cascade's deferred tokens share one depth across rows): its batches then run to
    # their end before new rows start.
    joinable: bool = True
    needs_heads: bool = False  # drafts or exits from exit heads (make_strategy warns when none are attached)

    def extra_positions(self) -> int:
        """Cache slots needed beyond prompt + max_new_tokens (e.g. draft length)."""
        return 0

    def keep_hidden_layer(self) -> int | None:
        """Layer index whose input hidden states the cache should keep (None: keep nothing)."""
        return None

    def head_cache_dtype(self) -> torch.dtype | None:
        """Element type of the keys / values of an exit head that is a decoder layer (heads/block.py),
        kept beside the model's (KVCache.head_cache); None: the strategy's heads need none."""
        return None

    def prepare(self, state: DecodeState) -> None:
        """Called once after prefill, before the first step."""

    def warm_up(self, lm, max_rows: int) -> None:
        """Measure now what the strategy would otherwise measure in its first step of up to
        `max_rows` rows (a server calls it before it takes requests, so no request waits for it)."""

    @abstractmethod
    def step(self, state: DecodeState) -> StepOutput: ...

    def select_rows(self, keep: list[int]) -> None:
        """Rows not in `keep` finished; drop any per-row state the strategy holds."""

    def add_rows(self, state: DecodeState, n: int) -> None:
        """The last n rows of `state` joined the running batch (prefilled, their last token pending);
        set up any per-row state the strategy holds for them (prepare() did it for the first rows)."""

    def describe(self) -> dict:
        return {"strategy": self.name}
