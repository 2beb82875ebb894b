"""Token sequences and the one teacher forward over them, shared by training, calibration,
evaluation and the benchmark's quality metrics.

A sequence is a prompt followed by a continuation: `ids[:start]` is the prompt, `ids[start:]` the
tokens that are trained or scored, each predicted from the position before it. The teacher pass
runs through exitspec's layered runtime (not HF's forward), so the hidden states a head trains on
are bit-for-bit the ones it will read while decoding. Right padding needs no attention mask: a
causal query never sees the pads that follow its row's real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitspec.runtime.layered import LayeredModel


@dataclass
class TokenSequence:
    """Token ids whose positions start..len-1 are trained / scored (start = the prompt's length;
    0 for plain text, where every token after the first is trained). A multi-turn conversation also
    marks which tokens are answers (`answer`, one flag per token): training on answers only then
    skips the later user turns too."""

    ids: list[int]
    start: int
    answer: list[bool] | None = None

    def __post_init__(self):
        if not 0 <= self.start <= len(self.ids):
            raise ValueError(f"a sequence's prompt length must lie in 0..{len(self.ids)}, got {self.start}")
        if self.answer is not None and len(self.answer) != len(self.ids):
            raise ValueError(f"answer flags ({len(self.answer)}) must match the tokens ({len(self.ids)})")

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.start


def scored_sequence(ids: list[int], start: int) -> TokenSequence:
    """A sequence with a prompt and at least one scored token (what evaluation and calibration read)."""
    if not 1 <= start < len(ids):
        raise ValueError(f"a sequence needs a prompt and at least one scored token (start={start}, len={len(ids)})")
    return TokenSequence(ids, start)


@dataclass
class TeacherPass:
    hidden: dict[int, torch.Tensor]  # exit layer -> (B, T, C) hidden state after that many layers
    logits: torch.Tensor | None  # (B, T - logits_from, V) full-model logits at positions logits_from..T-1


@torch.no_grad()
def teacher_pass(lm: LayeredModel, ids: torch.Tensor, layers: list[int], *, logits_from: int = 0,
                 logits: bool = True) -> TeacherPass:
    """ids (B, T) right-padded -> hidden states after each layer in `layers` and final logits.

    The one teacher forward of exitspec: training targets and held-out evaluation / calibration
    (teacher_forward) both run it. no_grad, not inference_mode: the hidden states become inputs of
    trainable heads, and autograd refuses to save inference tensors for backward (evaluation wraps
    it in inference_mode itself). logits_from skips the LM head on leading positions nobody scores
    (a prompt): at V = 49k the LM head is a large share of a small model's compute. logits=False stops
    after the deepest of `layers` (the teacher's outputs come from elsewhere, e.g. a cache on disk)."""
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
    for stop in sorted(set(layers)) + ([lm.num_layers] if logits else []):
        h = lm.run_layers(h, pos, cache, start, stop, ctx=ctx)
        if stop < lm.num_layers:
            hidden[stop] = h
        start = stop
    return TeacherPass(hidden=hidden, logits=lm.logits(h[:, logits_from:]) if logits else None)


def scored_rows(seq: TokenSequence) -> slice:
    """The positions start-1..len-2 of a sequence, whose states predict its scored tokens."""
    return slice(seq.start - 1, len(seq.ids) - 1)


@torch.inference_mode()
def teacher_forward(lm: LayeredModel, seq: TokenSequence, layers: list[int],
                    whole: bool = False) -> tuple[torch.Tensor, dict]:
    """One full forward over a scored sequence (teacher_pass), sliced to its scored rows.

    Returns (full logits (N, V), {layer: hidden (N, C)}) at the N = seq.n_scored predicting positions
    start-1..len-2, i.e. row j predicts token ids[start + j]. whole=True keeps every position's hidden
    state, (T, C) (a head that attends over earlier positions reads them; `scored_rows` slices).
    """
    seq = scored_sequence(seq.ids, seq.start)
    rows = slice(None) if whole else scored_rows(seq)
    tp = teacher_pass(lm, torch.tensor([seq.ids]), layers, logits_from=seq.start - 1)
    return tp.logits[0, :-1], {layer: h[0, rows] for layer, h in tp.hidden.items()}
