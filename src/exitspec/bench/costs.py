"""Where a decode's work goes, per generated token, in layer-equivalents: the bench report's cost split.

A decode step on a memory-bound CPU costs about the weights it reads, so the unit is one decoder
layer run for one token (a "layer-equivalent"), and one LM-head row costs `head_cost` of them (the
head's parameters over a layer's, decoding/exits.head_cost; on the default model the head alone is
several layers' worth). From counts the strategies already keep (decoder layers run, the exit
histogram, the rows the gates ran their heads for), per generated token:

- path: the layers a token ran before it was emitted (cascade: its exit layer, the full depth for a
  token no exit took; mlp-skip: every layer, a layer with its MLP skipped counting its attention
  share; vanilla: every layer);
- recomputed: layers run for a token after it was emitted (cascade's deferred recomputation of an
  exited token's skipped layers, or the attention passes of CALM state propagation);
- skipped: layers never run (L - path - recomputed): the saving;
- gates: the exits' confidence tests, in head rows (pre-check subset rows weighted by N / V, plus the
  full LM head at an exit, which also gives an exiting token its logits; with cascade's exit_vocab the
  exit's N-token head instead, also weighted by N / V, which both decides and emits);
- head: the final LM head, for the tokens that reached the top;
- adapt: the per-request threshold adaptation's teacher pass over the prompt window
  (decoding/adapt.py: its layers and head rows), spread over the request's tokens;
- total = path + recomputed + gates + head + adapt, and its ratio to vanilla's L + one head.

Why this split: a lossy mode is faster only if skipped > gates + the overheads, and the split says
which part eats the saving (issue 20: on the default model a full-vocabulary gate at every exit
costs more than the layers an exit saves). Recomputed layers run batched (one call per segment of
deferred tokens), which on a memory-bound CPU reads the weights once for several tokens, so they
cost less than their count here. The split is a model from counts, not a timing.
"""

from __future__ import annotations


def cost_split(num_layers: int, head_cost: float, tokens: int, layers_computed: float,
               exit_hist: dict, gates: dict | None = None) -> dict[str, float] | None:
    """Per-token layer-equivalents of one configuration (see the module docstring).

    layers_computed: decoder layers run, summed over tokens (RowStats.layers_computed); exit_hist:
    {exit layer: tokens} (the full depth for tokens the full model chose); gates: the strategy's
    cost_counts() ({"precheck_heads", "exit_heads", "vocab_heads"} in LM-head rows, {"adapt_layers",
    "adapt_heads"} for the adaptation passes), None for a strategy without gates. None when nothing was
    generated."""
    if tokens <= 0:
        return None
    L = num_layers
    hist = {int(k): int(v) for k, v in exit_hist.items()}
    run = layers_computed / tokens
    path = min(run, sum(layer * n for layer, n in hist.items()) / tokens)
    g = gates or {}
    gate_rows = g.get("precheck_heads", 0.0) + g.get("exit_heads", 0.0) + g.get("vocab_heads", 0.0)
    out = {"path": path, "recomputed": max(0.0, run - path), "skipped": max(0.0, L - run),
           "gates": gate_rows * head_cost / tokens, "head": hist.get(L, 0) * head_cost / tokens,
           "adapt": (g.get("adapt_layers", 0.0) + g.get("adapt_heads", 0.0) * head_cost) / tokens}
    out["total"] = out["path"] + out["recomputed"] + out["gates"] + out["head"] + out["adapt"]
    out["vs_vanilla"] = out["total"] / (L + head_cost)
    return out
