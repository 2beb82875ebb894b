"""Continuous batching in the decode engine: rows join a running batch, leave it at once, and each
gets exactly what it gets decoded alone (greedy, and seeded sampling under the lossless strategies)."""

from __future__ import annotations

import pytest
import torch

import exitspec
from exitspec.decoding.api import make_strategy
from exitspec.decoding.driver import GenerateConfig
from exitspec.decoding.engine import Engine
from exitspec.decoding.events import FinishEvent, TokenEvent
from exitspec.decoding.sampling import RowSampling, SamplingParams, probs, sample
from helpers_strategies import with_heads

LOSSLESS = [("vanilla", {}), ("lookup", {"draft_len": 3}), ("self-spec", {"exit_layer": 3, "draft_len": 2})]


@pytest.fixture(scope="module")
def model():
    return with_heads("llama")


def ids(m, text: str) -> list[int]:
    return m.tokenizer(text)["input_ids"]


def solo(m, text: str, n: int, strategy="vanilla", options=None, **sampling) -> list[int]:
    return exitspec.generate(m, None, prompt_ids=[ids(m, text)], max_new_tokens=n, ignore_eos=True,
                             strategy=strategy, **(options or {}), **sampling).token_ids[0]


def config(n: int, **sampling) -> GenerateConfig:
    return GenerateConfig(max_new_tokens=n, sampling=SamplingParams(**sampling), ignore_eos=True)


def run(engine: Engine, until=None) -> dict[int, FinishEvent]:
    """Step until the engine is empty (or `until(events so far)` says stop); finish events by row."""
    done: dict[int, FinishEvent] = {}
    while engine.busy:
        for ev in engine.step():
            if isinstance(ev, FinishEvent):
                done[ev.row] = ev
        if until is not None and until(done):
            break
    return done


@pytest.mark.parametrize("name,options", LOSSLESS, ids=[s for s, _ in LOSSLESS])
@pytest.mark.parametrize("chunk", [None, 5])
def test_a_row_joining_mid_decode_gets_its_solo_output(model, name, options, chunk):
    """B arrives after A has decoded several steps (its prefill chunked between A's steps); C joins
    while B is still prefilling or decoding; every row equals its solo greedy decode."""
    engine = Engine(model.lm, model.tokenizer, make_strategy(name, model, **options), heads=model.heads,
                    max_rows=4, prefill_tokens=chunk)
    a = engine.add(ids(model, "abc abc abc"), config(20))
    tokens: dict[int, list[int]] = {}
    peak = 0

    def step() -> None:
        nonlocal peak
        for ev in engine.step():
            if isinstance(ev, TokenEvent):
                tokens.setdefault(ev.row, []).extend(ev.token_ids)
        peak = max(peak, engine.last_batch)

    for _ in range(4):
        step()
    assert len(tokens[a]) >= 3 and peak == 1  # (chunk 5: the first step only prefills half of A)
    b = engine.add(ids(model, "a much longer prompt than the others, long enough for chunks"), config(12))
    step()
    c = engine.add(ids(model, "x"), config(16))
    while engine.busy:
        step()
    assert peak == 3  # all three decoded in one step at some point
    assert tokens[a] == solo(model, "abc abc abc", 20, name, options)
    assert tokens[b] == solo(model, "a much longer prompt than the others, long enough for chunks", 12, name, options)
    assert tokens[c] == solo(model, "x", 16, name, options)


def test_a_cancelled_row_leaves_at_once_and_frees_its_cache_row(model):
    engine = Engine(model.lm, model.tokenizer, make_strategy("lookup", model), heads=model.heads, max_rows=4)
    a = engine.add(ids(model, "hello there"), config(40))
    b = engine.add(ids(model, "medium prompt"), config(16))
    for _ in range(3):
        engine.step()
    assert engine.state.cache.batch == 2
    engine.cancel(a)
    events = engine.step()
    fin = [ev for ev in events if isinstance(ev, FinishEvent)]
    assert [(f.row, f.reason) for f in fin] == [(a, "cancelled")] and len(fin[0].token_ids) >= 3
    assert all(ev.row == b for ev in events if isinstance(ev, TokenEvent))  # the cancelled row got no tokens
    assert engine.state.cache.batch == 1 and len(engine.strategy.indexes) == 1 and engine.last_batch == 1
    done = run(engine)
    assert done[b].token_ids == solo(model, "medium prompt", 16, "lookup")
    assert not engine.busy and engine.state is None  # the last row took the cache with it
    # A row cancelled before it ever ran leaves without a token.
    w = engine.add(ids(model, "zzz"), config(8))
    engine.cancel(w)
    assert [(e.row, e.reason, e.token_ids) for e in engine.step()] == [(w, "cancelled", [])]


@pytest.mark.parametrize("name,options", LOSSLESS, ids=[s for s, _ in LOSSLESS])
def test_rows_with_their_own_sampling_settings_give_their_solo_output(model, name, options):
    """Greedy, seeded hot and seeded nucleus rows in one batch, with their own max_tokens and stop
    strings: each row gives exactly what it gives alone (per-row generators)."""
    texts = ["hello there", "a much longer prompt than the others", "medium prompt", "x"]
    settings = [dict(), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_p=0.8, seed=11), dict()]
    limits = [18, 14, 20, 9]
    engine = Engine(model.lm, model.tokenizer, make_strategy(name, model, **options), heads=model.heads,
                    max_rows=4)
    rows = [engine.add(ids(model, t), config(n, **s)) for t, n, s in zip(texts, limits, settings, strict=True)]
    done = run(engine)
    for r, t, n, s in zip(rows, texts, limits, settings, strict=True):
        assert done[r].token_ids == solo(model, t, n, name, options, **s), (t, s)
        assert done[r].reason == "length" and done[r].stats.batch_peak == 4


def test_cascade_batches_run_to_their_end_before_new_rows_start():
    m = with_heads("llama", thresholds={2: 0.3})
    engine = Engine(m.lm, m.tokenizer, make_strategy("cascade", m, exit_layers=[2]), heads=m.heads, max_rows=4)
    a = engine.add(ids(m, "hello"), config(6))
    engine.step()
    b = engine.add(ids(m, "world"), config(6))
    order = []
    while engine.busy:
        order += [ev.row for ev in engine.step() if isinstance(ev, TokenEvent)]
    assert order == [a] * order.count(a) + [b] * order.count(b)  # b started after a had finished
    ref = exitspec.generate(m, None, prompt_ids=[ids(m, "world")], max_new_tokens=6, ignore_eos=True,
                            strategy="cascade", exit_layers=[2])
    assert order.count(b) == len(ref.token_ids[0])


def test_row_sampling_draws_each_row_as_alone():
    logits = torch.randn(3, 2, 10)
    rows = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.5, top_p=0.5)]
    gens = [None, rows[1].generator(), torch.Generator().manual_seed(9)]
    rs = RowSampling(rows, gens)
    assert not rs.uniform and not rs.greedy
    p = probs(logits, rs)
    for b in range(3):
        torch.testing.assert_close(p[b], probs(logits[b], rows[b]))
    tok = sample(logits, rs)
    alone = [logits[0].argmax(-1), sample(logits[1:2], rows[1], rows[1].generator())[0],
             sample(logits[2:3], rows[2], torch.Generator().manual_seed(9))[0]]
    assert tok.tolist() == [t.tolist() for t in alone]
    rs.select([0])
    assert rs.uniform and rs.greedy


def fused_fp16_model():
    """The tiny Llama on the fused int4 stack with an fp16 cache and norm_lm exits at layers 2 and 3."""
    from exitspec.heads.bundle import HeadBundle
    from exitspec.loading import LoadedModel
    from test_int4 import quantized_tiny

    q = quantized_tiny("llama")
    m = LoadedModel(model=q.model, tokenizer=q.tokenizer, name=q.name, source=q.source, int4=q.int4,
                    kv_cache=torch.float16)
    assert m.lm.adapter.fused
    m.heads = HeadBundle.create(m.lm, [2, 3], "norm_lm")
    return m


def join_on_the_fused_stack(m, name: str, options: dict) -> Engine:
    """One row decodes, two more join it (prefill chunks of 8) and all leave at their own lengths;
    each row's tokens equal its solo output. Returns the engine (its strategy's counters)."""
    engine = Engine(m.lm, m.tokenizer, make_strategy(name, m, **options), heads=m.heads, max_rows=3,
                    prefill_tokens=8)
    rows = {engine.add(ids(m, "hello there"), config(14)): ("hello there", 14)}
    for _ in range(3):
        engine.step()
    rows[engine.add(ids(m, "a much longer prompt than the others"), config(6))] = (
        "a much longer prompt than the others", 6)
    rows[engine.add(ids(m, "x"), config(18))] = ("x", 18)
    done = run(engine)
    for r, (text, n) in rows.items():
        assert done[r].token_ids == solo(m, text, n, name, options), (name, text)
    return engine


def test_rows_join_and_leave_on_the_fused_int4_stack_with_an_fp16_cache(kernel_isa):
    """The fused C++ stack runs every row of the cache it gets: joins (KVCache.append) and leaves
    (reorder) must hand it contiguous caches, and each row still gets its solo output (hybrid's run:
    test_hybrid.py, which also counts its cycles)."""
    m = fused_fp16_model()
    for name, options in LOSSLESS:
        join_on_the_fused_stack(m, name, options)


@pytest.mark.parametrize("name,options", LOSSLESS[:2], ids=[s for s, _ in LOSSLESS[:2]])
def test_a_burst_streams_group_by_group_and_each_row_gets_its_solo_output(model, name, options):
    """Four requests arrive at once with a prefill chunk that holds one prompt: the first row's
    first token comes before the last row's prompt is in (it does not wait for the whole burst's
    prefill), the burst runs as one batch in the end, and every row equals its solo greedy decode."""
    texts = ["abc abc abc", "hello there friend", "one two one two", "xyz xy x"]
    prompts = [ids(model, t) for t in texts]
    engine = Engine(model.lm, model.tokenizer, make_strategy(name, model, **options), heads=model.heads,
                    max_rows=4, prefill_tokens=max(len(p) for p in prompts))
    rows = [engine.add(p, config(12)) for p in prompts]
    first_token_step: dict[int, int] = {}
    tokens: dict[int, list[int]] = {r: [] for r in rows}
    step = 0
    while engine.busy:
        step += 1
        for ev in engine.step():
            if isinstance(ev, TokenEvent) and ev.token_ids:
                first_token_step.setdefault(ev.row, step)
                tokens[ev.row] += ev.token_ids
    assert first_token_step[rows[0]] < first_token_step[rows[-1]]
    assert max(first_token_step.values()) <= len(rows)  # one group per step: none waits for the others to end
    for r, text in zip(rows, texts, strict=True):
        assert tokens[r] == solo(model, text, 12, name, options)
