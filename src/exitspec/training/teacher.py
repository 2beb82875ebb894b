"""One forward of the frozen base serves every exit: hidden states at all exit layers + final logits.

The pass runs through exitspec's layered runtime (not HF's forward), so the hidden states a head
trains on are bit-for-bit the ones it will read while decoding. Right padding needs no attention
mask: a causal query never sees the pads that follow its row's real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitspec.runtime.layered import LayeredModel


@dataclass
class TeacherPass:
    hidden: dict[int, torch.Tensor]  # exit layer -> (B, T, C) hidden state after that many layers
    logits: torch.Tensor  # (B, T - logits_from, V) full-model logits at positions logits_from..T-1


@torch.no_grad()
def teacher_pass(lm: LayeredModel, ids: torch.Tensor, layers: list[int], *, logits_from: int = 0) -> TeacherPass:
    """ids (B, T) right-padded -> hidden states after each layer in `layers` and final logits.

    The one teacher forward of exitspec: training targets (compute_targets) and held-out evaluation /
    calibration (calibration.sequences.teacher_forward) both run it.
    no_grad, not inference_mode: the hidden states become inputs of trainable heads, and autograd
    refuses to save inference tensors for backward (evaluation wraps it in inference_mode itself).
    logits_from skips the LM head on leading positions nobody scores (a prompt): at V = 49k the LM
    head is a large share of a small model's compute."""
    if any(not 0 < layer < lm.num_layers for layer in layers):
        raise ValueError(f"exit layers {layers} must lie in 1..{lm.num_layers - 1}")
    B, T = ids.shape
    if lm.max_positions < T:
        raise ValueError(f"a sequence of {T} tokens exceeds the model's {lm.max_positions} positions; "
                         "use shorter prompts or fewer new tokens")
    ids = ids.to(lm.device)
    pos = torch.arange(T, device=lm.device).expand(B, T).contiguous()
    cache = lm.new_cache(B, T)
    h = lm.embed(ids, pos)  # (B, T, C)
    ctx = lm.context(h, pos)
    hidden, start = {}, 0
    for stop in sorted(set(layers)) + [lm.num_layers]:
        h = lm.run_layers(h, pos, cache, start, stop, ctx=ctx)
        if stop < lm.num_layers:
            hidden[stop] = h
        start = stop
    return TeacherPass(hidden=hidden, logits=lm.logits(h[:, logits_from:]))


@dataclass
class Targets:
    """What the heads train on for one sequence, at its trained positions only (n of them)."""

    hidden: dict[int, torch.Tensor]  # exit layer -> (n, C)
    top_ids: torch.Tensor | None  # (n, k) teacher's top-k token ids; None = full logits kept
    top_logits: torch.Tensor  # (n, k) their logits, or (n, V) full logits
    labels: torch.Tensor  # (n,) next token (-100 where the sequence ends)

    @staticmethod
    def cat(items: list[Targets]) -> Targets:
        return Targets(hidden={x: torch.cat([t.hidden[x] for t in items]) for x in items[0].hidden},
                       top_ids=None if items[0].top_ids is None else torch.cat([t.top_ids for t in items]),
                       top_logits=torch.cat([t.top_logits for t in items]),
                       labels=torch.cat([t.labels for t in items]))

    @property
    def tokens(self) -> int:
        return len(self.labels)


def compute_targets(lm: LayeredModel, examples: list, layers: list[int], *, pad_id: int, batch_size: int,
                    topk: int, answer_only: bool, progress: bool = True) -> list[Targets]:
    """One teacher pass over every example (length-sorted batches), kept per example.

    The heads are small, so the frozen teacher dominates a training step; running it once and
    reusing its outputs across epochs makes every epoch after the first nearly free. With topk > 0
    only the teacher's top-k logits per position are kept (KD against the top-k-renormalised
    teacher, the usual "sparse KD"), which also keeps memory at n*k instead of n*V."""
    from tqdm import tqdm

    from exitspec.training.data import collate

    out: list[Targets | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    bar = tqdm(total=len(examples), desc="teacher pass", unit="seq", disable=not progress)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = collate([examples[i] for i in idx], pad_id, answer_only)
        tp = teacher_pass(lm, batch.ids, layers)
        for b, i in enumerate(idx):
            m = batch.mask[b].to(lm.device)
            logits = tp.logits[b][m].float()  # (n, V)
            if topk > 0:
                vals, ids = logits.topk(min(topk, logits.shape[-1]), dim=-1)
            else:
                vals, ids = logits, None
            out[i] = Targets(hidden={x: tp.hidden[x][b][m].clone() for x in layers}, top_ids=ids,
                             top_logits=vals.clone(), labels=batch.labels[b].to(lm.device)[m])
        bar.update(len(idx))
    bar.close()
    return out
