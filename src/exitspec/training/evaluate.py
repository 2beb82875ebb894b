"""How close each exit head gets to the full model, on held-out prompts answered by the full model.

For every exit layer, over the positions that predict answer tokens of the full model's own greedy
answers: KL(p_full || p_exit) (token mean, T = 1), perplexity of the exit head on those greedy
tokens, and top-1 agreement (exit argmax == full-model argmax). `norm_lm` (the untrained logit lens)
is the baseline every trained head must beat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exitspec.heads.bundle import HeadBundle
from exitspec.prompts import mixed_prompts
from exitspec.training.data import DistillSettings, Example, collate, self_distill
from exitspec.training.teacher import teacher_pass


@dataclass
class ExitMetrics:
    layer: int
    kl: float
    ppl: float  # perplexity of the exit head on the full model's greedy tokens
    top1: float  # fraction of positions where exit argmax == full argmax
    tokens: int


def heldout_examples(model, per_set: int, cache: str | Path, max_new_tokens: int = 128) -> list[Example]:
    """Full-model greedy answers to HELD-OUT prompts (never trained on), cached like training data."""
    prompts = mixed_prompts("heldout", per_set)
    return self_distill(model, prompts, cache, DistillSettings(max_new_tokens=max_new_tokens), progress=False)


@torch.no_grad()
def evaluate_heads(model, bundles: dict[str, HeadBundle], examples: list[Example],
                   batch_size: int = 8) -> dict[str, list[ExitMetrics]]:
    """Metrics per bundle name and exit layer, from one teacher pass per batch shared by all bundles."""
    lm = model.lm
    layers = sorted({x for b in bundles.values() for x in b.layers})
    pad = model.tokenizer.pad_token_id or 0
    sums = {name: {x: torch.zeros(4, dtype=torch.float64) for x in b.layers} for name, b in bundles.items()}
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i: i + batch_size], pad, answer_only=True)
        # Positions predicting answer tokens: answer_only mask, and a next token must exist.
        mask = (batch.mask & (batch.labels >= 0)).to(lm.device)
        tp = teacher_pass(lm, batch.ids, layers)
        full = tp.logits[mask].float()  # (N, V)
        logp_full = F.log_softmax(full, -1)
        target = batch.labels.to(lm.device)[mask]
        full_top = full.argmax(-1)
        for name, bundle in bundles.items():
            for x in bundle.layers:
                logits = bundle.head(x)(tp.hidden[x][mask]).float()  # (N, V)
                logp = F.log_softmax(logits, -1)
                kl = (logp_full.exp() * (logp_full - logp)).sum(-1)
                nll = -logp.gather(-1, target[:, None]).squeeze(-1)
                agree = (logits.argmax(-1) == full_top).double()
                sums[name][x] += torch.stack([kl.sum().double(), nll.sum().double(), agree.sum(),
                                              torch.tensor(float(len(kl)), dtype=torch.float64)])
    out = {}
    for name, per_layer in sums.items():
        out[name] = [ExitMetrics(x, kl=float(s[0] / s[3]), ppl=float(torch.exp(s[1] / s[3])),
                                 top1=float(s[2] / s[3]), tokens=int(s[3])) for x, s in sorted(per_layer.items())]
    return out


def metrics_table(results: dict[str, list[ExitMetrics]]) -> str:
    lines = [f"{'heads':<10} {'layer':>5} {'KL':>8} {'ppl':>9} {'top1':>7} {'tokens':>7}"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"{name:<10} {r.layer:>5} {r.kl:>8.4f} {r.ppl:>9.2f} {100 * r.top1:>6.1f}% {r.tokens:>7}")
    return "\n".join(lines)


def metrics_json(results: dict[str, list[ExitMetrics]]) -> dict:
    return {name: {str(r.layer): {k: v for k, v in asdict(r).items() if k != "layer"} for r in rows}
            for name, rows in results.items()}
