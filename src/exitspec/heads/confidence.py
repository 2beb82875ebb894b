"""Confidence scores of an exit's next-token distribution, used to decide whether to trust it."""

from __future__ import annotations

import torch

SCORES = ("max_prob", "entropy", "margin")


def scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """logits (..., V) -> max_prob, entropy (nats) and top-2 margin, each (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    return {
        "max_prob": top2[..., 0],
        "entropy": -(p * logp).sum(-1),
        "margin": top2[..., 0] - top2[..., 1],
    }


def confident(score_name: str, value: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where the score passes the threshold (entropy passes when *below* it)."""
    if score_name == "entropy":
        return value <= threshold
    return value >= threshold
