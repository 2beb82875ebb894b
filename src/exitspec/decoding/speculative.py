"""Verification of drafted tokens: the one accept / reject rule of every speculative strategy.

Given the target model's logits at the pending token and at each draft (K+1 positions) and the
drafts with the distributions they were drawn from, decide per row how many drafts to keep and
which token comes next. The rule is standard speculative sampling (Leviathan et al. 2023, Chen et
al. 2023): keep draft x with probability min(1, p(x) / q(x)); at the first rejection draw the
correction from the residual max(0, p - q) renormalised; if every draft is kept draw a bonus token
from p at the position after the last draft. The emitted tokens then follow p exactly, whatever q
is, as long as q is the distribution the draft was really drawn from (a reduced draft vocabulary
is just a q that is zero outside the subset).

Greedy decoding is the one-hot limit (p = onehot(argmax), q = onehot(draft)): keep iff the draft
is the target's argmax, and the correction is the argmax, so greedy output equals vanilla's token
for token. That case is computed without building (B, K, V) one-hots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitspec.decoding.sampling import RowSampling, Sampling, greedy_tokens, probs, sample_from, uniform_draws


@dataclass
class Verdict:
    accepted: torch.Tensor  # (B,) long: drafts kept per row (0..limit)
    next_token: torch.Tensor  # (B,) long: the correction (or bonus) token; it becomes pending


def verify(
    target_logits: torch.Tensor,  # (B, K+1, V): logits after the pending token and after each draft
    drafts: torch.Tensor,  # (B, K) long
    draft_probs: torch.Tensor | None,  # (B, K, V) q of each draft (None when greedy)
    params: Sampling,  # one setting, or each row's (RowSampling, which carries the generators)
    generator: torch.Generator | None = None,
    limit: torch.Tensor | None = None,  # (B,) drafts really proposed per row (rest are padding)
) -> Verdict:
    B, K = drafts.shape
    if limit is None:
        limit = torch.full((B,), K, dtype=torch.long, device=drafts.device)
    if params.greedy:
        target = greedy_tokens(target_logits).to(drafts.device)  # (B, K+1)
        ok = drafts == target[:, :K]
        n = _accepted_prefix(ok, limit)
        # Whether the row stopped at a rejection or ran out of drafts, the next token is the
        # target's argmax at that position: the correction and the bonus coincide.
        return Verdict(accepted=n, next_token=target.gather(1, n[:, None])[:, 0])
    p = probs(target_logits, params)  # (B, K+1, V), the same warping as plain sampling
    assert draft_probs is not None, "sampling verification needs the draft distributions"
    return rejection_step(p, draft_probs, drafts, params if isinstance(params, RowSampling) else generator, limit)


def rejection_step(
    p: torch.Tensor,  # (B, K+1, V) target distributions
    q: torch.Tensor,  # (B, K, V) draft distributions
    drafts: torch.Tensor,  # (B, K) long, drafts[b, i] ~ q[b, i]
    generator: torch.Generator | RowSampling | None,  # RowSampling: each row draws from its own
    limit: torch.Tensor,  # (B,)
) -> Verdict:
    """Speculative rejection sampling, every position and row at once."""
    B, K = drafts.shape
    idx = drafts[..., None]
    p_x = p[:, :K].gather(-1, idx)[..., 0]  # (B, K) target probability of each draft
    q_x = q.gather(-1, idx)[..., 0]  # (B, K) draft probability (> 0: the draft was drawn from q)
    u = uniform_draws((B, K), generator, p.device, limit)
    # u < p/q  <=>  u * q < p, which avoids dividing by a q that padding rows may hold as 0.
    ok = u * q_x < p_x
    n = _accepted_prefix(ok, limit)
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, n]  # (B, V) target distribution at the first rejected (or bonus) position
    q_n = q[rows, n.clamp(max=K - 1)] if K > 0 else torch.zeros_like(p_n)
    rejected = (n < limit)[:, None]
    # After a rejection the correction comes from max(0, p - q): the part of p that drafting
    # under-covers. Without a rejection (all `limit` drafts kept) the bonus comes from p itself.
    residual = torch.where(rejected, (p_n - q_n).clamp(min=0), p_n)
    mass = residual.sum(-1, keepdim=True)
    # p == q makes the residual empty, but then the rejection probability was 0 too; guard anyway.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_n)
    return Verdict(accepted=n, next_token=sample_from(residual, generator))


def _accepted_prefix(ok: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """(B, K) accept flags -> (B,) length of the accepted prefix, capped at `limit`.

    cumprod turns the flags into "this draft and every earlier one was accepted": a draft after a
    rejected one was conditioned on a token that will not be emitted, so it is void even when its
    own test passes. Drafts at index >= limit were never proposed (a row that stopped drafting
    early inside a batch that kept going) and count as rejected.
    """
    K = ok.shape[1]
    proposed = torch.arange(K, device=ok.device)[None, :] < limit[:, None]
    return (ok & proposed).long().cumprod(1).sum(1)
