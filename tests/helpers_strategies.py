"""Shared helpers of the strategy tests: tiny models with exit heads, reference decoders."""

from __future__ import annotations

import torch

import exitspec
from conftest import tiny_loaded
from exitspec.decoding.events import TokenEvent
from exitspec.heads.bundle import HeadBundle

PROMPTS = ["hi", "a much longer prompt than the others", "medium prompt", "x"]


def with_heads(family: str, layers=(1, 2, 3, 4, 5), thresholds: dict | None = None):
    """A tiny model with norm_lm exit heads attached; thresholds {layer: max_prob value}."""
    m = tiny_loaded(family)
    m.heads = HeadBundle.create(m.lm, list(layers), "norm_lm")
    for layer, value in (thresholds or {}).items():
        m.heads.config.thresholds[str(layer)] = {"score": "max_prob", "value": value}
    return m


def greedy(m, prompts, n=24, **kw):
    return exitspec.generate(m, prompts, chat=False, max_new_tokens=n, ignore_eos=True, **kw)


def tokens_and_exits(m, prompts, n=24, **kw) -> tuple[list[list[int]], list[list[int]]]:
    """Generated ids and the exit layer of every token, per row, from the event stream."""
    toks = [[] for _ in prompts]
    exits = [[] for _ in prompts]
    for ev in exitspec.stream(m, prompts, chat=False, max_new_tokens=n, ignore_eos=True, **kw):
        if isinstance(ev, TokenEvent):
            toks[ev.row].extend(ev.token_ids)
            exits[ev.row].extend(ev.exit_layers)
    return toks, exits


@torch.inference_mode()
def reference_hidden(lm, ids: list[int], frozen: dict[int, int] | None = None, skip_mlp=frozenset(),
                     skip_from: int = 0) -> list:
    """Hidden states entering every layer for all positions of `ids`, from a fresh cache in one pass
    per layer. `frozen` {position: layer e}: from layer e on, that position's input is its layer-e
    hidden state (CALM state propagation); None = the exact model. `skip_mlp` layers skip their MLP
    for positions >= skip_from. Returns [h_0 .. h_L], each (T, C)."""
    frozen = frozen or {}
    T = len(ids)
    x = torch.tensor([ids])
    pos = torch.arange(T)[None]
    cache = lm.new_cache(1, T + 1)
    h = lm.embed(x, pos)
    hs = [h[0]]
    keep = {}
    for m in range(lm.num_layers):
        inp = h.clone()
        for p, e in frozen.items():
            if e == m:
                keep[p] = h[0, p].clone()
            if e <= m:
                inp[0, p] = keep[p]
        a = lm.run_layers(inp[:, :skip_from], pos[:, :skip_from], cache, m, m + 1) if skip_from else inp[:, :0]
        b = lm.run_layers(inp[:, skip_from:], pos[:, skip_from:], cache, m, m + 1, skip_mlp=skip_mlp)
        h = torch.cat([a, b], 1)
        hs.append(h[0])
    return hs
