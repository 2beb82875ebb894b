"""Distillation losses for exit heads, optionally over a reduced vocabulary.

KD: token-mean KL(p_full || p_exit) at temperature T, scaled by T^2 (Hinton et al.) so gradient
magnitudes do not shrink as T grows. Reduced vocabulary: the LM-head matmul over 49k tokens, forward
and backward, dominates the cost of a small adapter; with sparse teacher targets (top-k per
position) the student is scored over a fixed subset S of the vocabulary — the tokens carrying the
most teacher probability over the whole training set — and both distributions are renormalised over
S. The frozen LM head needs no weight gradient, so the backward through it is one (N,S)x(S,C) matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exitspec.heads.base import ExitHead
from exitspec.training.teacher import Targets


@dataclass
class VocabSubset:
    ids: torch.Tensor | None  # (S,) token ids kept, sorted; None = the whole vocabulary
    vocab_size: int

    @classmethod
    def from_targets(cls, targets: list[Targets], vocab_size: int, size: int, reduce=None) -> VocabSubset:
        """The `size` tokens with the most teacher probability over all sparse targets (+ all labels).
        size 0 keeps every token that appears in some top-k; dense targets keep the whole vocabulary.
        `reduce` sums a tensor over data-parallel processes, so that they all pick the same subset."""
        if targets[0].top_ids is None:
            return cls(None, vocab_size)
        return cls.from_mass(*teacher_mass(targets, vocab_size), vocab_size, size, reduce)

    @classmethod
    def from_mass(cls, mass: torch.Tensor, is_label: torch.Tensor, vocab_size: int, size: int,
                  reduce=None) -> VocabSubset:
        """from_targets over teacher_mass sums (accumulated batch by batch when the teacher streams)."""
        if reduce is not None:
            mass, is_label = reduce(mass), reduce(is_label)
        keep = torch.nonzero(mass > 0).squeeze(-1)
        if 0 < size < len(keep):
            keep = mass.topk(size).indices
        keep = torch.unique(torch.cat([keep, torch.nonzero(is_label > 0).squeeze(-1)]))
        return cls(keep, vocab_size)  # unique() sorts

    @property
    def size(self) -> int:
        return self.vocab_size if self.ids is None else len(self.ids)

    def teacher(self, t: Targets) -> torch.Tensor:
        """Teacher logits over the subset (N, S); tokens outside the top-k get -inf."""
        if t.top_ids is None:
            return t.top_logits if self.ids is None else t.top_logits.index_select(-1, self.ids.to(t.labels.device))
        ids = self.ids.to(t.top_ids.device) if self.ids is not None else None
        slot = t.top_ids if ids is None else self._slots(ids)[t.top_ids]  # (N, k) position in S or -1
        dense = torch.full((t.tokens, self.size + 1), float("-inf"), device=t.top_logits.device)
        dense.scatter_(1, torch.where(slot >= 0, slot, self.size), t.top_logits.float())
        return dense[:, : self.size]

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        table = torch.full((self.vocab_size,), -1, dtype=torch.long, device=ids.device)
        table[ids] = torch.arange(len(ids), device=ids.device)
        return table

    def head_logits(self, head: ExitHead, x: torch.Tensor) -> torch.Tensor:  # (N, C) normed -> (N, S)
        w, b = head.head_weight(), head.head_bias()
        if self.ids is not None:
            ids = self.ids.to(w.device)
            w = w.index_select(0, ids)
            b = b.index_select(0, ids) if b is not None else None
        return F.linear(x.to(w.dtype), w, b)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Label ids mapped into the subset (-100 stays -100)."""
        if self.ids is None:
            return labels
        slots = self._slots(self.ids.to(labels.device))[labels.clamp_min(0)]
        return torch.where(labels >= 0, slots, labels)


def add_mass(mass: torch.Tensor, top_ids: torch.Tensor, top_logits: torch.Tensor) -> None:
    """Add to (V,) `mass` the teacher probability of sparse targets: top-k ids and logits (N, k),
    renormalised over the k."""
    mass.index_add_(0, top_ids.flatten().long().cpu(), top_logits.float().softmax(-1).flatten().double().cpu())


def teacher_mass(targets: list[Targets], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V,) teacher probability per token summed over sparse targets, (V,) 1 where a token is a label:
    sums over any split of the data add up to the whole's."""
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    is_label = torch.zeros(vocab_size, dtype=torch.float64)
    for t in targets:
        add_mass(mass, t.top_ids, t.top_logits)
        labels = t.labels.cpu()
        is_label[labels[labels >= 0]] = 1.0  # every label stays in the subset (for the CE term)
    return mass, is_label


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher/T) || softmax(student/T)) * T^2; inputs (N, V).
    Teacher entries of -inf (outside its kept top-k) have zero probability and contribute nothing."""
    t = temperature
    logp_t = F.log_softmax(teacher.float() / t, dim=-1)
    logp_s = F.log_softmax(student.float() / t, dim=-1)
    p_t = logp_t.exp()
    kl = torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t)).sum(-1)
    return kl.mean() * t * t


def exit_loss(head: ExitHead, t: Targets, teacher: torch.Tensor, vocab: VocabSubset,
              temperature: float, ce_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, KD part) of one exit; `teacher` is vocab.teacher(t), shared by all exits."""
    logits = vocab.head_logits(head, t.normed(head))  # (N, S)
    kd = kd_loss(logits, teacher, temperature)
    loss = kd
    if ce_weight > 0:
        lab = vocab.labels(t.labels)
        if (lab >= 0).any():
            loss = loss + ce_weight * F.cross_entropy(logits.float(), lab, ignore_index=-100)
    return loss, kd.detach()
