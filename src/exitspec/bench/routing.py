"""Teacher-forced routing of a cascade: which exit emits each token of a given text, and from what.

Why it is exact: cascade's deferred recomputation (decoding/deferred.py) runs every exited token's
skipped layers before any deeper token reads them, so at every position the exit states are the
full model's, and the cascade's choice there depends only on them and its gates (exits.CheckedExit,
with the pre-check). One teacher pass over the text therefore gives, position by position, the
exit the cascade takes and the distribution it samples from (tested against its own greedy decode).
Two uses: log-likelihoods of a lossy mode for task accuracy (bench/tasks.py), and CascadeExit's
routing table in the benchmark report (tokens per exit, their top-1 agreement with the full model,
the full model's perplexity of them). With exit_vocab an exit emits from its N-token subset, so an
exited position's distribution is that subset's, -inf outside it. A cascade that adapts its thresholds
per request (decoding/adapt.py) is routed with the thresholds it adapts to on the text's prompt, as it
decodes.

mlp-skip's head probe is exact under teacher forcing too: it reads the state after `exit_layer`
layers, and below `start_layer` (>= exit_layer) every layer runs in full for every token, so those
states are the full model's whatever was skipped above. `early_exits` gives, per generated token,
whether the mode exited early (cascade: an exit below the top; mlp-skip: its upper MLPs skipped) and
the full model's top-1 there: what the token recovery rate (bench/metrics.py) counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from exitspec.bench.metrics import token_recovery_rate
from exitspec.decoding.strategies.cascade import Cascade
from exitspec.decoding.strategies.mlp_skip import MLPSkip
from exitspec.runtime.sequences import teacher_pass


@dataclass
class Routing:
    """Per scored position: the logits the mode emits from, the full model's, and the layer they came from."""

    logits: torch.Tensor  # (N, V) float
    full: torch.Tensor  # (N, V) float, the full model's
    layer: torch.Tensor  # (N,) long: the exit that was confident, or L


@torch.inference_mode()
def route(model, strategy, ids: list[int], start: int) -> Routing:
    """Teacher-forced routing of tokens ids[start:] (positions start-1..len-2 predict them): the
    cascade's shallowest confident exit at each position, with its gates and pre-check, else the full
    model; any other strategy emits from the full model everywhere."""
    lm = model.lm
    exits = []
    if isinstance(strategy, Cascade):
        if strategy.propagate:
            raise ValueError("cascade with state_propagation writes approximate upper-layer states, so teacher "
                             "forcing cannot reproduce it: score loglikelihood tasks without it")
        strategy.adapt_to(lm, [ids[:start]])  # the thresholds it decodes this prompt with
        exits = strategy.exits
    rows = slice(start - 1, len(ids) - 1)  # position t predicts token t + 1
    tp = teacher_pass(lm, torch.tensor([ids]), [e.layer for e in exits], logits_from=start - 1)
    full = tp.logits[0, :-1].float()  # (N, V)
    logits = full.clone()
    layer = torch.full((full.shape[0],), lm.num_layers, dtype=torch.long)
    decided = torch.zeros(full.shape[0], dtype=torch.bool, device=full.device)
    for ex in exits:  # shallowest first, as the cascade decides
        ok, exit_logits = ex.confident(tp.hidden[ex.layer][0, rows], ~decided)
        if exit_logits is not None:  # with exit_vocab: -inf outside the exit's N tokens, as it emits
            logits[ok] = ex.full_logits(exit_logits[ok]).float()
            layer[ok.cpu()] = ex.layer
            decided |= ok
    return Routing(logits, full, layer)


def routing_table(model, strategy, sequences: list[tuple[list[int], list[int]]]) -> dict[str, dict]:
    """CascadeExit's routing table over (prompt, generated) pairs: per layer that emitted tokens, how
    many, how often its choice is the full model's top-1, and the full model's perplexity of them."""
    by: dict[int, list] = {}
    for prompt, gen in sequences:
        if not gen:
            continue
        r = route(model, strategy, prompt + gen, len(prompt))
        target = torch.tensor(gen, device=r.full.device)
        nll = -torch.log_softmax(r.full, -1).gather(-1, target[:, None])[:, 0]
        agree = r.logits.argmax(-1) == r.full.argmax(-1)
        for layer in r.layer.unique().tolist():
            sel = (r.layer == layer).to(nll.device)
            acc = by.setdefault(layer, [0, 0.0, 0.0])
            acc[0] += int(sel.sum())
            acc[1] += float(agree[sel].sum())
            acc[2] += float(nll[sel].sum())
    return {str(layer): {"tokens": n, "top1_agreement": a / n, "perplexity": math.exp(min(s / n, 700.0))}
            for layer, (n, a, s) in sorted(by.items())}


@torch.inference_mode()
def early_exits(model, strategy, prompt: list[int], generated: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per generated token, teacher-forced: (exited early (n,) bool, the full model's top-1 (n,) long),
    None for a mode whose early exits teacher forcing cannot reproduce (other strategies, cascade with
    state propagation, mlp-skip's cosine probe: they read states that earlier skips changed)."""
    lm = model.lm
    ids, start = prompt + generated, len(prompt)
    if isinstance(strategy, Cascade) and not strategy.propagate:
        r = route(model, strategy, ids, start)
        return r.layer < lm.num_layers, r.full.argmax(-1).cpu()
    if isinstance(strategy, MLPSkip) and strategy.exit is not None:
        strategy.adapt_to(lm, [prompt])
        layer = strategy.exit.layer
        tp = teacher_pass(lm, torch.tensor([ids]), [layer], logits_from=start - 1)
        settled, _ = strategy.exit.confident(tp.hidden[layer][0, start - 1: len(ids) - 1])
        return settled.cpu(), tp.logits[0, :-1].argmax(-1).cpu()
    return None


def token_recovery(model, strategy, sequences: list[tuple[list[int], list[int]]]) -> dict | None:
    """Over (prompt, generated) pairs of a greedy run: tokens that exited early and how many of them are
    the full model's top-1 (bench/metrics.token_recovery_rate); None where early_exits cannot tell."""
    exited = recovered = total = 0
    for prompt, gen in sequences:
        if not gen:
            continue
        flags = early_exits(model, strategy, prompt, gen)
        if flags is None:
            return None
        r, e = token_recovery_rate(gen, flags[1].tolist(), flags[0].tolist())
        recovered, exited, total = recovered + r, exited + e, total + len(gen)
    return {"trr": recovered / exited if exited else None, "exited": exited, "tokens": total}
