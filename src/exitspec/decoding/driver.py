"""`decode()`: a batch of tokenised prompts through the engine, as one stream of events with stats.

One loop for every strategy and every caller: `decode()` adds its prompts to an `Engine`
(engine.py) and steps it until every row has finished, so the CLI, the Python API, the benchmarks
and the server (which keeps engines running and adds requests as they come) share the same
stopping, detokenisation and statistics whichever strategy produced the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from exitspec.decoding.config import GenerateConfig, GenerationError, eos_ids_for
from exitspec.decoding.engine import Engine
from exitspec.decoding.events import DoneEvent, Event, FinishEvent, GenerationStats, RowStats, TokenEvent
from exitspec.decoding.strategy import Strategy
from exitspec.decoding.text import RowText as _RowText
from exitspec.runtime.clock import now
from exitspec.runtime.layered import LayeredModel

# Callers import these from here (they live where the engine can import them without a cycle).
__all__ = ["GenerateConfig", "GenerationError", "eos_ids_for", "decode", "_RowText"]


def decode(
    lm: LayeredModel,
    tokenizer,
    prompts: list[list[int]],
    strategy: Strategy,
    config: GenerateConfig,
    heads: object | None = None,
) -> Iterator[Event]:
    """Generate for a batch of tokenised prompts, yielding events (see decoding/events.py).

    Every row has `config`'s settings and the rows share one random generator (seeded by
    config.sampling.seed), so a batch with a seed reproduces itself; the prompts are prefilled
    together and decoded as one batch from which finished rows leave."""
    config.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt must have at least one token")
    B = len(prompts)
    engine = Engine(lm, tokenizer, strategy, heads=heads, max_rows=B)
    generator = config.sampling.generator(lm.device) if not config.sampling.greedy else None
    for p in prompts:  # row ids 0..B-1, in order; a prompt that cannot fit raises before any work
        engine.add(list(p), config, generator)
    stats = GenerationStats(strategy=strategy.name, num_layers=lm.num_layers, batch=B,
                            prompt_tokens=sum(len(p) for p in prompts), rows=[RowStats() for _ in prompts])
    generated: list[list[int]] = [[] for _ in prompts]
    final_text = [""] * B
    reasons = [""] * B
    t0 = now(lm.device)
    first_token_at = None
    while engine.busy:
        for ev in engine.step():
            if isinstance(ev, TokenEvent) and first_token_at is None:
                first_token_at = now(lm.device)
            elif isinstance(ev, FinishEvent):
                generated[ev.row], final_text[ev.row], reasons[ev.row] = ev.token_ids, ev.text, ev.reason
                stats.rows[ev.row] = ev.stats
            yield ev
    end = now(lm.device)
    stats.prefill_s = engine.prefill_s
    stats.new_tokens = sum(len(g) for g in generated)
    stats.time_to_first_token_s = (first_token_at or end) - t0
    stats.decode_s = end - t0 - stats.prefill_s
    stats.total_s = end - t0
    yield DoneEvent(stats=stats, texts=final_text, token_ids=generated, finish_reasons=reasons)
