"""Training targets: one teacher pass of the frozen base (runtime/sequences.teacher_pass) serves every
exit, kept per sequence as the exits' hidden states and the teacher's (top-k) logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from exitspec.heads.base import ExitHead
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.sequences import TokenSequence, teacher_pass
from exitspec.training.data import collate
from exitspec.training.teacher_cache import SparseTargets


@dataclass
class Targets:
    """What the heads train on for one sequence (or several, concatenated), at its n trained positions.

    A contextual exit (heads/block.py: a head that attends over earlier positions) keeps the whole
    sequence's states instead, in `hidden` too: (T, C) per sequence, `lengths` the T of each and
    `trained` (sum T,) which of their positions are trained (the same n, in the same order)."""

    hidden: dict[int, torch.Tensor]  # exit layer -> (n, C); a contextual exit: (sum T, C)
    top_ids: torch.Tensor | None  # (n, k) teacher's top-k token ids; None = full logits kept
    top_logits: torch.Tensor  # (n, k) their logits, or (n, V) full logits
    labels: torch.Tensor  # (n,) next token (-100 where the sequence ends)
    contextual: frozenset[int] = frozenset()  # exit layers whose hidden holds whole sequences
    lengths: list[int] | None = None  # with contextual exits: T of each sequence
    trained: torch.Tensor | None = None  # with contextual exits: (sum T,) bool

    @staticmethod
    def cat(items: list[Targets]) -> Targets:
        ctx = items[0].contextual
        return Targets(hidden={x: torch.cat([t.hidden[x] for t in items]) for x in items[0].hidden},
                       top_ids=None if items[0].top_ids is None else torch.cat([t.top_ids for t in items]),
                       top_logits=torch.cat([t.top_logits for t in items]),
                       labels=torch.cat([t.labels for t in items]), contextual=ctx,
                       lengths=[n for t in items for n in t.lengths] if ctx else None,
                       trained=torch.cat([t.trained for t in items]) if ctx else None)

    @property
    def tokens(self) -> int:
        return len(self.labels)

    def normed(self, head: ExitHead) -> torch.Tensor:
        """The head's final-normed features at the n trained positions: (n, C)."""
        h = self.hidden[head.layer]
        if head.layer not in self.contextual:
            return head.normed(h)
        # Whole sequences, right-padded into one batch: causal attention never reads the pads.
        padded = nn.utils.rnn.pad_sequence(list(h.split(self.lengths)), batch_first=True)  # (B, T, C)
        x = head.normed(padded)
        return torch.cat([x[b, :n] for b, n in enumerate(self.lengths)])[self.trained.to(x.device)]


def compute_targets(lm: LayeredModel, examples: list[TokenSequence], layers: list[int], *, pad_id: int, batch_size: int,
                    topk: int, answer_only: bool, progress: bool = True,
                    sparse: SparseTargets | None = None, index: list[int] | None = None,
                    contextual: frozenset[int] = frozenset()) -> list[Targets]:
    """One teacher pass over every example (length-sorted batches), kept per example.

    The heads are small, so the frozen teacher dominates a training step; running it once and
    reusing its outputs across epochs makes every epoch after the first nearly free. With topk > 0
    only the teacher's top-k logits per position are kept (KD against the top-k-renormalised
    teacher, the usual "sparse KD"), which also keeps memory at n*k instead of n*V. With `sparse` (the
    top-k targets of the data set, on disk, and `index`: each example's position in it) the base runs
    only up to the deepest exit: the rest of the layers and the LM head are read, not computed.
    `contextual` exits keep each sequence's states at every position (see Targets)."""
    out: list[Targets | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    bar = tqdm(total=len(examples), desc="teacher pass", unit="seq", disable=not progress)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = collate([examples[i] for i in idx], pad_id, answer_only)
        tp = teacher_pass(lm, batch.ids, layers, logits=sparse is None)
        for b, i in enumerate(idx):
            m = batch.mask[b].to(lm.device)
            if sparse is not None:
                ids, vals = sparse.of(index[i], lm.device)
            elif topk > 0:
                vals, ids = tp.logits[b][m].float().topk(min(topk, tp.logits.shape[-1]), dim=-1)  # (n, k)
            else:
                vals, ids = tp.logits[b][m].float(), None  # (n, V)
            n = len(examples[i].ids)
            out[i] = Targets(hidden={x: (tp.hidden[x][b][:n] if x in contextual else tp.hidden[x][b][m]).clone()
                                     for x in layers}, top_ids=ids,
                             top_logits=vals.clone(), labels=batch.labels[b].to(lm.device)[m],
                             contextual=contextual, lengths=[n] if contextual else None,
                             trained=m[:n].cpu() if contextual else None)
        bar.update(len(idx))
    bar.close()
    return out
