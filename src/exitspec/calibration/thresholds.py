"""Choosing an exit's confidence threshold: the largest coverage that keeps a target agreement.

Sort tokens by confidence, most confident first. Accepting the top k gives coverage k/N and an
agreement (share of accepted tokens whose exit top-1 equals the full model's) of cumsum(agree)[k]/k.
We take the largest k whose agreement reaches the target, restricted to cuts between *distinct*
score values (a threshold cannot split ties), and set the threshold to the k-th score, so that
`confident(score, s, value)` accepts exactly those k tokens on the calibration data.

Cuts that accept fewer than MIN_ACCEPTED tokens are ignored (their agreement is noise). When no cut
reaches the target the exit must never fire: the threshold is put beyond every observed
score (a finite number, so bundle.json stays plain JSON) and coverage is 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from exitspec.heads.confidence import ALL_SCORES, LOWER_IS_CONFIDENT, MIN_ACCEPTED, agreement_cut, confident


@dataclass
class ThresholdChoice:
    score: str
    value: float
    target_agreement: float
    coverage: float  # share of calibration tokens accepted
    agreement: float | None  # agreement among accepted tokens (None when none are accepted)
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_target(target: float) -> float:
    target = float(target)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target agreement must be in (0, 1], got {target}; e.g. --target 0.95")
    return target


def select_threshold(values: torch.Tensor, agree: torch.Tensor, target: float, score: str,
                     min_accepted: int = MIN_ACCEPTED) -> ThresholdChoice:
    """values (N,) of `score`, agree (N,) bool -> the maximal-coverage threshold reaching `target`
    (heads/confidence.agreement_cut). Cuts accepting fewer than `min_accepted` tokens are not
    considered; when no cut reaches the target the exit never fires.
    """
    target = check_target(target)
    if score not in ALL_SCORES:
        raise ValueError(f"unknown confidence score {score!r}; choose one of {', '.join(ALL_SCORES)}")
    values = values.detach().flatten().cpu()
    agree = agree.detach().flatten().cpu().bool()
    n = values.numel()
    if n == 0 or agree.numel() != n:
        raise ValueError(f"need matching non-empty scores and labels, got {n} scores and {agree.numel()} labels")
    if torch.isnan(values).any():
        raise ValueError(f"{score} scores contain NaN; the exit head produces invalid logits")
    cut = agreement_cut(values, agree, target, score, min_accepted)
    if cut is None:
        never = float(values.max() + 1.0) if score not in LOWER_IS_CONFIDENT else float(values.min() - 1.0)
        return ThresholdChoice(score, never, target, 0.0, None, n)
    value, accepted, agreement = cut
    # Sanity: the threshold accepts exactly the chosen prefix on this data.
    assert int(confident(score, values, value).sum()) == accepted, (int(confident(score, values, value).sum()),
                                                                      accepted)
    return ThresholdChoice(score, value, target, accepted / n, agreement, n)


def coverage_at(values: torch.Tensor, agree: torch.Tensor, score: str, value: float) -> tuple[float, float | None]:
    """(coverage, agreement among accepted) of a fixed threshold on other data."""
    acc = confident(score, values, value)
    n_acc = int(acc.sum())
    if values.numel() == 0:
        raise ValueError("no tokens to measure coverage on")
    return n_acc / values.numel(), (float(agree[acc].float().mean()) if n_acc else None)


def pick_best(choices: dict[str, ThresholdChoice]) -> ThresholdChoice:
    """Highest coverage; ties go to the earlier score in ALL_SCORES (the cheaper, simpler one)."""
    if not choices:
        raise ValueError("no candidate thresholds to choose from")
    order = [s for s in ALL_SCORES if s in choices]
    return max((choices[s] for s in order), key=lambda c: (c.coverage, -order.index(c.score)))
