"""What decoding yields: token events while it runs, one finish event per row, then a done event.

The CLI, the Python API and the HTTP server all consume this one stream, so every strategy streams
the same way everywhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    row: int  # the row's id: the prompt's index in generate()'s batch, Engine.add()'s return value
    token_ids: list[int]  # tokens accepted this step (several per step for speculative strategies)
    text: str  # new text since the last event of this row (may be "" while a character is incomplete)
    exit_layers: list[int]  # per token: the layer whose output chose it (num_layers = full model)


@dataclass
class RowStats:
    new_tokens: int = 0
    steps: int = 0  # strategy steps (= target-model calls for speculative strategies)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    layers_computed: float = 0.0  # sum over emitted tokens of decoder layers run for them
    exit_layers: Counter = field(default_factory=Counter)
    accept_lengths: list[int] = field(default_factory=list)  # accepted drafts per verification
    draft_lengths: list[int] = field(default_factory=list)  # drafts verified per verification (the row's own)
    batch_peak: int = 0  # most rows decoded together in one step while this row ran
    # Seconds of its steps outside the model's forwards (LayeredModel.clock): drafting, verification's
    # argmax, the engine's bookkeeping; a step shared by several rows counts in full for each.
    host_s: float = 0.0
    cycle_sources: list[str] = field(default_factory=list)  # per step, where its drafts came from (hybrid)


@dataclass
class FinishEvent:
    row: int
    reason: str  # "eos", "stop" (a stop string), "length", or "cancelled" (Engine.cancel)
    token_ids: list[int]  # every generated token of this row
    text: str  # the full generated text (stop string removed)
    stats: RowStats | None = None  # this row's statistics


@dataclass
class GenerationStats:
    strategy: str
    num_layers: int
    batch: int
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    rows: list[RowStats] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.rows)

    @property
    def drafted(self) -> int:
        return sum(r.drafted for r in self.rows)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rows)

    @property
    def mean_accepted(self) -> float:
        """E[accepted drafts] per verification (without the +1 token the target always adds)."""
        lens = [n for r in self.rows for n in r.accept_lengths]
        return sum(lens) / len(lens) if lens else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def layers_per_token(self) -> float:
        return sum(r.layers_computed for r in self.rows) / self.new_tokens if self.new_tokens else 0.0

    @property
    def exit_histogram(self) -> dict[int, int]:
        total: Counter = Counter()
        for r in self.rows:
            total.update(r.exit_layers)
        return dict(sorted(total.items()))

    def summary(self) -> dict:
        return {
            "strategy": self.strategy,
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "total_s": round(self.total_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "time_to_first_token_s": round(self.time_to_first_token_s, 4),
            "steps": self.steps,
            "tokens_per_step": round(self.tokens_per_step, 3),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "mean_accepted": round(self.mean_accepted, 3),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "layers_per_token": round(self.layers_per_token, 2),
            "exit_histogram": {str(k): v for k, v in self.exit_histogram.items()},
        }


@dataclass
class DoneEvent:
    stats: GenerationStats
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]


Event = TokenEvent | FinishEvent | DoneEvent
