"""Benchmark metrics as plain functions of numbers and tensors (tested on hand-made values).

Conventions, stated once because papers differ:
- E[accepted] is the mean number of *draft* tokens accepted per verification (target call). The
  verification always adds one token of its own, so the mean tokens per verification ("mean
  accepted length", tau in the Medusa/EAGLE papers) is E[accepted] + 1.
- acceptance rate = E[accepted] / gamma, with gamma the mean number of drafts per verification
  (the configured draft length when drafts are never cut short).
- overlap(p, q) = sum_v min(p_v, q_v) is the expected acceptance of one speculative-sampling step
  (Leviathan et al., 2023); TV = 1 - overlap = 0.5 * sum |p - q|.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence

import torch


# --- distributions -------------------------------------------------------------------------------
def overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v min(p, q) over the last dim: (..., V) x (..., V) -> (...)."""
    return torch.minimum(p, q).sum(-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV distance = 1 - overlap (= 0.5 * L1 for normalised p, q): (..., V) -> (...)."""
    return 1.0 - overlap(p, q)


def kl_divergence(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) from logits (..., V) -> (...), in nats."""
    lp = torch.log_softmax(target_logits.float(), -1)
    lq = torch.log_softmax(draft_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of targets (...) under logits (..., V) -> (...)."""
    return -torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


# --- speculative decoding ------------------------------------------------------------------------
def acceptance(accept_lengths: Sequence[int], drafted: int) -> dict:
    """From accepted drafts per verification and the total drafted: E[accepted], gamma, rate, tau."""
    n = len(accept_lengths)
    if n == 0:
        return {"mean_accepted": None, "gamma_mean": None, "acceptance_rate": None, "mean_accept_length": None}
    e = sum(accept_lengths) / n
    gamma = drafted / n
    return {"mean_accepted": e, "gamma_mean": gamma, "acceptance_rate": e / gamma if gamma else None,
            "mean_accept_length": e + 1.0}  # + the token every verification adds itself


def calls_per_token(calls: int | None, tokens: int) -> float | None:
    """Target (full-model) calls per generated token; 1.0 for vanilla decoding."""
    return calls / tokens if calls is not None and tokens else None


def layers_per_token(layers: float | None, tokens: int) -> float | None:
    return layers / tokens if layers is not None and tokens else None


def token_recovery_rate(tokens: Sequence[int], full_top: Sequence[int], exited: Sequence[bool]) -> tuple[int, int]:
    """Token recovery rate (TRR) of a lossy mode, as (recovered, exited): of the tokens that exited
    early (`exited`: cascade emitted them from an exit below the top, mlp-skip skipped their upper
    MLPs), how many equal the full model's top-1 at the same position given the same prefix (the mode's
    own output, teacher-forced: `full_top`). TRR = recovered / exited; the other tokens came from the
    full model and are not counted. It is the lossy counterpart of the acceptance rate: the share of
    cheap tokens that are the full model's. We found no published formula to follow (SEDAC's repository
    gives none), so the definition is this one. Defined for greedy decoding (a sampled token is not the
    full model's top-1 even when nothing exited)."""
    if not len(tokens) == len(full_top) == len(exited):
        raise ValueError(f"tokens ({len(tokens)}), full-model top-1 ({len(full_top)}) and exit flags "
                         f"({len(exited)}) must match position for position")
    out = [t == f for t, f, e in zip(tokens, full_top, exited, strict=True) if e]
    return sum(out), len(out)


def merge_histograms(hists: Iterable[dict]) -> dict[int, int]:
    total: Counter = Counter()
    for h in hists:
        total.update({int(k): int(v) for k, v in h.items()})
    return dict(sorted(total.items()))


# --- quality -------------------------------------------------------------------------------------
def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of the reference's positions where `tokens` has the same token (missing = wrong)."""
    if not reference:
        return float("nan")
    return sum(a == b for a, b in zip(tokens, reference, strict=False)) / len(reference)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in a text (GSM8K's answer convention: the final number is the answer), commas
    and a trailing ".0" dropped; None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    n = found[-1].replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def answer_agreement(text: str, reference: str) -> bool | None:
    """Whether two answers end in the same number (a lossy mode's GSM8K answer vs vanilla's); None
    when the reference has no number to agree with."""
    ref = final_number(reference)
    return None if ref is None else final_number(text) == ref


def until_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    """The answer part of a run's tokens: up to (not including) the first EOS. The bench ignores EOS to
    time a fixed budget; what a model writes after its answer ended is not part of the answer."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return list(tokens[:i])
    return list(tokens)


def first_mismatch(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts), None when identical."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


# --- statistics ----------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bootstrap_ci(values: Sequence, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 stat=statistics.fmean) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap over the given per-prompt values."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    point = stat(vals)
    if len(vals) == 1 or n_boot <= 0:
        return point, point, point
    rng = random.Random(seed)
    boots = sorted(stat(rng.choices(vals, k=len(vals))) for _ in range(n_boot))
    lo_i = int(math.floor((1 - level) / 2 * n_boot))
    hi_i = min(n_boot - 1, int(math.ceil((1 + level) / 2 * n_boot)) - 1)
    return point, boots[lo_i], boots[hi_i]


def throughput(tokens: Sequence[int], seconds: Sequence[float]) -> float:
    """Aggregate tokens/s over prompts: total tokens / total time (long prompts weigh more)."""
    t = sum(seconds)
    return sum(tokens) / t if t > 0 else float("nan")


def speedup(tps: float, baseline_tps: float | None) -> float | None:
    return tps / baseline_tps if baseline_tps else None
