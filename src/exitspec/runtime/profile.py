"""Where a decode step's time goes: embedding, decoder layers, final norm + LM head, per k new tokens.

Speculative verification lives or dies by how a k-token step costs relative to a 1-token step, so
this measures exactly that, on a warm cache of a realistic length. The layers are split into their
attention halves (norm, q/k/v and o products, rotary, cache write, attention over the cache: the
layers run with every MLP skipped) and their MLP halves (the rest). On the default model's int4
kernels (AVX2 build, 256 cached tokens) the MLP halves stay flat from 1 to 4 rows (their products
are bound by reading the weights) while the attention halves grow, so up to 4 rows the k-row cost is
attention (fp32 FMAs over the cache for every query row and head) and the per-row glue around it; at
8 rows both grow, the weight products turning compute-bound as well.

Inside the fused stack (timers around its parts, now `LlamaStack.take_times`; same model, AVX2): for
1 new token the q4 products (67 MB of codes read from DRAM) and the q8 LM head (30 MB, also
DRAM-bound) are most of the step, attention, glue, norm, embedding, rotary tables and argmax the
rest; for 8 new tokens the products (8 x 134.5 M int8 multiply-adds) are compute-bound, and they and
the 8-row head take nearly as long with their operands in cache: past ~4 rows an AVX2 step without
VNNI is bound by int8 arithmetic, not by memory, whatever the code around it does. Figures:
benchmarks/README.md, 'Design measurements' (and 'Run history', Zen 3).
"""

from __future__ import annotations

import statistics
import weakref

import torch

from exitspec.runtime.clock import now
from exitspec.runtime.layered import LayeredModel


def median_ms(fn, repeats: int, warmup: int = 3, device: torch.device | None = None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = now(device)
        fn()
        times.append(now(device) - t)
    return statistics.median(times) * 1000


def warm_cache(lm: LayeredModel, context: int, new: int, hidden_layer: int | None = None,
               generator: torch.Generator | None = None, head_cache: torch.dtype | None = None):
    """A batch-1 cache prefilled with `context` random tokens, with room for `new` more: returns
    (cache, ids, positions) of all context + new tokens, the new ones at [:, context:]."""
    n = context + new
    cache = lm.new_cache(1, n + 1, hidden_layer=hidden_layer, head_cache=head_cache)
    ids = torch.randint(0, lm.vocab_size, (1, n), generator=generator).to(lm.device)
    pos = torch.arange(n, device=lm.device)[None]
    lm.forward(ids[:, :context], pos[:, :context], cache)
    return cache, ids, pos


def full_step(lm: LayeredModel, x: torch.Tensor, p: torch.Tensor, cache) -> torch.Tensor:
    """One full-model step over new tokens x at positions p (both (B, T)): logits (B, T, V)."""
    return lm.logits(lm.run_layers(lm.embed(x, p), p, cache, 0, lm.num_layers))


@torch.inference_mode()
def step_costs(lm: LayeredModel, context: int = 256, ks=(1, 2, 4, 8), repeats: int = 20) -> list[dict]:
    """ms of one forward over k new tokens after `context` cached tokens, split by part: the fastest
    of `repeats` interleaved rounds (every k and part once per round, as `row_cost_curve` and
    `context_costs` do). Medians of back-to-back repeats per k were unstable: as a shared VM's speed
    drifted between the k, the 8-row / 1-row ratio moved widely on the same code.
    Where a fused stack runs the layers, rows also carry its own split of the fastest layers call:
    stack_products_ms (the weight products), stack_attention_ms (attention over the cache) and
    stack_glue_ms (norms, RoPE, cache writes, SiLU, input quantization)."""
    cache, ids, pos = warm_cache(lm, context, max(ks))
    no_mlp = frozenset(range(lm.num_layers))  # the attention halves: same cache writes, MLP blocks left out
    jobs = {}
    for k in ks:
        x, p = ids[:, context:context + k], pos[:, context:context + k]
        h0 = lm.embed(x, p)
        h_last = lm.run_layers(h0, p, cache, 0, lm.num_layers)
        jobs |= {
            (k, "step_ms"): lambda x=x, p=p: full_step(lm, x, p, cache),
            (k, "embed_ms"): lambda x=x, p=p: lm.embed(x, p),
            (k, "layers_ms"): lambda h0=h0, p=p: lm.run_layers(h0, p, cache, 0, lm.num_layers),
            (k, "attention_ms"): lambda h0=h0, p=p: lm.run_layers(h0, p, cache, 0, lm.num_layers, skip_mlp=no_mlp),
            (k, "head_ms"): lambda h_last=h_last: lm.logits(h_last),
        }
    times = {key: [] for key in jobs}
    stack_parts = {k: [] for k in ks}  # the fused stack's own split of each timed layers call
    for rnd in range(repeats + 1):
        for key, fn in jobs.items():
            lm.adapter.take_stack_times()  # drop what earlier calls left
            t = now(lm.device)
            fn()
            if rnd:  # round 0 warms up
                times[key].append(now(lm.device) - t)
                if key[1] == "layers_ms":
                    stack_parts[key[0]].append(lm.adapter.take_stack_times())
    rows = [{"k": k, **{part: min(times[(k, part)]) * 1000 for kk, part in jobs if kk == k}} for k in ks]
    for r in rows:
        parts = stack_parts[r["k"]]
        if parts and parts[0] is not None:  # the split of the fastest layers call
            fastest = parts[min(range(len(parts)), key=times[(r["k"], "layers_ms")].__getitem__)]
            r |= {f"stack_{name}_ms": ms for name, ms in fastest.items()}
    base = rows[0]["step_ms"]
    for r in rows:
        r["per_layer_ms"] = r["layers_ms"] / lm.num_layers
        # Timed separately, so on a noisy machine the difference can dip below zero: clamp it.
        r["mlp_ms"] = max(0.0, r["layers_ms"] - r["attention_ms"])
        r["vs_k1"] = r["step_ms"] / base
    return rows


# Curves measured by row_costs, kept while their runtime lives.
_ROW_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POSITION_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def row_costs(lm: LayeredModel, max_rows: int) -> list[float]:
    """row_cost_curve up to max_rows, measured on first use for this runtime and kept, so that a
    strategy built for every generate call measures it once."""
    known = _ROW_COSTS.get(lm, [])
    if len(known) < max_rows:
        _ROW_COSTS[lm] = known = row_cost_curve(lm, max_rows)
    return known[:max_rows]


def position_costs(lm: LayeredModel, max_positions: int) -> dict[int, float]:
    """Cost of a step over n positions (all rows together) in 1-position steps, measured at
    n = 1, 2, 4, ... up to max_positions on first use for this runtime and kept: what a speculative
    strategy weighs when a batch of rows verifies drafts in one step (past a few positions the
    products are compute-bound and every drafted position costs as much as a row of its own)."""
    max_positions = max(1, min(max_positions, lm.max_positions // 2))  # a short-context model: what fits
    known = _POSITION_COSTS.get(lm, {})
    if not known or max(known) < max_positions:
        points = sorted({1 << i for i in range(max_positions.bit_length())} | {max_positions})
        _POSITION_COSTS[lm] = known = dict(zip(points, row_cost_curve(lm, max_positions, points=points),
                                               strict=True))
    return known


def interpolate_cost(costs: dict[int, float], n: int) -> float:
    """A position_costs table read at n positions, linear between the measured points."""
    points = sorted(costs)
    lo = max((p for p in points if p <= n), default=points[0])
    hi = min((p for p in points if p >= n), default=points[-1])
    if hi == lo:
        return costs[lo] * (n / lo if n > lo else 1.0)  # past the table: linear in positions
    return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)


@torch.inference_mode()
def row_cost_curve(lm: LayeredModel, max_rows: int, context: int = 256, repeats: int = 12,
                   points: list[int] | None = None) -> list[float]:
    """[1.0, cost of a 2-row step / a 1-row step, ..., up to max_rows], measured now.

    What a speculative strategy needs to size its drafts: verifying k drafts costs one (k+1)-row
    step. With exitspec's int4 kernels on the default model a 4-row step costs little more than a
    1-row one and an 8-row step clearly more (products become compute-bound past 4 rows), so the
    best draft length depends on the row count, not only on acceptance. Timed interleaved (every row
    count once per round) so that a drift of the machine's speed hits all alike, and the fastest of
    `repeats` rounds kept: on a shared machine a step is only ever slowed down by others, so the
    minimum is the stable reading (medians of a few rounds moved the 8-row cost widely). A
    cumulative maximum keeps noise from making more rows look cheaper than fewer. `points`: measure
    only these row counts (ascending, starting at 1) and return their costs in that order."""
    context = max(1, min(context, lm.max_positions - max_rows - 1))  # the cache must fit the model's context
    cache, ids, pos = warm_cache(lm, context, max_rows)
    times: dict[int, list[float]] = {k: [] for k in (points or range(1, max_rows + 1))}
    for rnd in range(repeats + 1):
        for k in times:
            x, p = ids[:, context:context + k], pos[:, context:context + k]
            t = now(lm.device)
            full_step(lm, x, p, cache)
            if rnd:  # round 0 warms up
                times[k].append(now(lm.device) - t)
    base = min(times[1])
    curve, worst = [], 0.0
    for k in times:
        worst = max(worst, min(times[k]) / base)
        curve.append(worst)
    curve[0] = 1.0
    return curve


@torch.inference_mode()
def context_costs(lms: dict[str, LayeredModel], contexts=(256, 1024, 2048), ks=(1, 4),
                  repeats: int = 10) -> list[dict]:
    """ms of one decode step over k new tokens after each number of cached tokens, for several
    runtimes of one model (e.g. an fp32 and an fp16 KV cache), fastest of `repeats` interleaved rounds.

    Attention reads every cached key and value once per step (the default model: 30 layers x 3 KV
    heads x 64 x 2 values per cached token, 46 KB in fp32), so this is the part of a step that grows
    with the context, and where the cache's element type shows. Interleaved like `row_cost_curve`
    (every runtime, context and k once per round; minimum kept) so that the comparison between
    runtimes survives a machine whose speed drifts."""
    # One prefill to the longest context per runtime (the same tokens for all); a step at position c
    # attends slots 0..c only (slots past it are stale and never read), so every context reuses it.
    state = {name: (lm, *warm_cache(lm, max(contexts), max(ks), generator=torch.Generator().manual_seed(0)))
             for name, lm in lms.items()}
    times: dict[tuple, list[float]] = {(n, c, k): [] for n in lms for c in contexts for k in ks}
    for rnd in range(repeats + 1):
        for (name, c, k), ts in times.items():
            lm, cache, ids, pos = state[name]
            x, p = ids[:, c:c + k], pos[:, c:c + k]
            t = now(lm.device)
            full_step(lm, x, p, cache)
            if rnd:  # round 0 warms up
                ts.append(now(lm.device) - t)
    return [{"runtime": n, "context": c, "k": k, "step_ms": min(ts) * 1000} for (n, c, k), ts in times.items()]


@torch.inference_mode()
def row_invariance(lm: LayeredModel, prompts: list[list[int]], k: int = 8) -> dict:
    """How much a row's logits depend on how many rows share its forward call.

    For each tokenised prompt (>= k + 1 tokens), the last k tokens are run once as one k-row call and
    once one row per call (what vanilla decoding does), on the same cache contents. Returns the max
    |logit difference| over all rows and the number of rows whose argmax differs. Lossless speculative
    decoding compares verification (k rows) against vanilla (1 row), so both should be 0.
    """
    worst, flips, rows = 0.0, 0, 0
    for ids in prompts:
        if len(ids) < k + 1:
            raise ValueError(f"prompts need at least {k + 1} tokens for k={k}")
        x = torch.tensor([ids], device=lm.device)
        pos = torch.arange(len(ids), device=lm.device)[None]
        ctx = len(ids) - k
        cache = lm.new_cache(1, len(ids))
        lm.forward(x[:, :ctx], pos[:, :ctx], cache)
        full = lm.forward(x[:, ctx:], pos[:, ctx:], cache)[0]  # (k, V)
        cache.rollback(ctx)
        one = torch.cat([lm.forward(x[:, t:t + 1], pos[:, t:t + 1], cache)[0] for t in range(ctx, len(ids))])
        worst = max(worst, float((one - full).abs().max()))
        flips += int((one.argmax(-1) != full.argmax(-1)).sum())
        rows += k
    return {"k": k, "rows": rows, "max_abs_logit_diff": worst, "argmax_flips": flips}
