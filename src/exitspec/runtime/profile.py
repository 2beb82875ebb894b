"""Where a decode step's time goes: embedding, decoder layers, final norm + LM head, per k new tokens.

Speculative verification lives or dies by how a k-token step costs relative to a 1-token step, so
this measures exactly that, on a warm cache of a realistic length.
"""

from __future__ import annotations

import statistics
import time

import torch

from exitspec.runtime.layered import LayeredModel


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


@torch.inference_mode()
def step_costs(lm: LayeredModel, context: int = 256, ks=(1, 2, 4, 8), repeats: int = 20) -> list[dict]:
    """Median ms of one forward over k new tokens after `context` cached tokens, split by part."""
    dev = lm.device
    cache = lm.new_cache(1, context + max(ks) + 1)
    ids = torch.randint(0, lm.vocab_size, (1, context + max(ks)), device=dev)
    pos = torch.arange(context + max(ks), device=dev)[None]
    lm.forward(ids[:, :context], pos[:, :context], cache)
    rows = []
    for k in ks:
        x, p = ids[:, context:context + k], pos[:, context:context + k]
        h0 = lm.embed(x, p)
        h_last = lm.run_layers(h0, p, cache, 0, lm.num_layers)

        def layers():
            lm.run_layers(h0, p, cache, 0, lm.num_layers)

        full = _median_ms(lambda: lm.logits(lm.run_layers(lm.embed(x, p), p, cache, 0, lm.num_layers)),
                          repeats)
        rows.append({
            "k": k,
            "step_ms": full,
            "embed_ms": _median_ms(lambda: lm.embed(x, p), repeats),
            "layers_ms": _median_ms(layers, repeats),
            "head_ms": _median_ms(lambda: lm.logits(h_last), repeats),
        })
    base = rows[0]["step_ms"]
    for r in rows:
        r["per_layer_ms"] = r["layers_ms"] / lm.num_layers
        r["vs_k1"] = r["step_ms"] / base
    return rows
