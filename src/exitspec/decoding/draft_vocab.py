"""Drafting from an exit head, optionally over a reduced vocabulary (the N most frequent tokens).

The LM head is the largest matmul of a small model's draft step (SmolLM2-135M: 49152 x 576, as many
weights as ~8 decoder layers' attention), so drafting from only the N most frequent tokens cuts the
draft step a lot. Verification still uses the full head, so speculative decoding stays lossless:
in greedy mode a draft outside the subset is simply never proposed; in sampling mode the draft
distribution q is zero outside the subset, which rejection sampling handles exactly.

Token frequencies: a list of token ids, most frequent first. Sources, in order: an explicit list,
`bundle.config.training["token_frequencies"]` when a bundle stores one, else counts of the tokens in
the train split of the shared prompt sets (prompts and reference answers, through the chat
template's special tokens), cached per tokenizer under the exitspec cache folder.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from exitspec.decoding.sampling import RowSampling, Sampling, probs, sample_from
from exitspec.heads.base import ExitHead
from exitspec.models.int4 import Q8Linear
from exitspec.models.kquants import GGUFBlocks, QuantLinear
from exitspec.models.ops import Linear, outside_inference_mode
from exitspec.paths import cache_dir
from exitspec.prompts import mixed_prompts


class DraftHead:
    """An exit head used for drafting: hidden (B, C) -> draft token (B,) and its distribution q."""

    def __init__(self, head: ExitHead, vocab: torch.Tensor | None = None):
        self.head = head
        self.layer = head.layer
        self.vocab = vocab  # (N,) long token ids, or None for the full vocabulary
        if vocab is not None:
            # Slice the rows once: (N, C). Tuned heads change their weights only when trained.
            self.proj = vocab_rows(head.lm, vocab, head.head_weight(), head.head_bias())

    def logits(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """(..., C) -> (..., N) logits over the draft vocabulary (N = V without a subset). A
        contextual head (heads/block.py) reads h (B, T, C) at `positions` (B, T) against `cache`."""
        if self.head.contextual:
            if positions is None:
                raise ValueError(f"the {self.head.kind} head at layer {self.layer} attends over earlier positions: "
                                 "pass the draft's positions and the decode cache")
            x = self.head.normed_at(h, positions, cache)
            return self.head.project(x) if self.vocab is None else self._subset(x)
        if self.vocab is None:
            return self.head(h)
        return self._subset(self.head.normed(h))

    def _subset(self, x: torch.Tensor) -> torch.Tensor:
        """The subset's rows of the head's logits: from the runtime's own LM head, softcapped as that
        head's are (LayeredModel.head; a Gemma config may set final_logit_softcapping)."""
        logits = self.proj(x)
        lm = self.head.lm
        cap = lm.adapter.logit_softcap if self.head.head_weight() is lm.lm_head.weight else None
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def to_full(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Subset logits (..., N) -> (..., V) with -inf outside the subset (for confidence scores)."""
        if self.vocab is None:
            return logits
        out = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
        return out.index_copy_(-1, self.vocab, logits)

    def choose(self, logits: torch.Tensor, params: Sampling, generator: torch.Generator | None,
               vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens (B,) and their full-vocabulary distribution q (B, V) (None when greedy).
        `params` may be each row's settings (RowSampling, which then also carries the generators)."""
        if params.greedy:
            idx = logits.argmax(-1)
            return (idx if self.vocab is None else self.vocab[idx]), None
        q = probs(logits, params)  # (B, N)
        tok = sample_from(q, params if isinstance(params, RowSampling) else generator)
        if self.vocab is None:
            return tok, q
        full = q.new_zeros(q.shape[0], vocab_size)
        return self.vocab[tok], full.index_copy_(-1, self.vocab, q)


def vocab_rows(lm, vocab: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """An LM head (`weight` (V, C), `bias`) restricted to `vocab`'s rows: final-normed (..., C) -> (..., N)
    logits, no softcap. Where `weight` is the runtime's own head (not a tuned copy), on the int4
    runtime's kernel where it has one (_quantised_rows); else fp32 rows. Made outside inference mode:
    kept by a strategy, used in and out of it."""
    with outside_inference_mode():
        rows = weight[vocab].contiguous()
        sub_bias = bias[vocab].contiguous() if bias is not None else None
        own = weight is lm.lm_head.weight
        return (_quantised_rows(lm, vocab, rows, sub_bias) if own else None) or Linear(rows, sub_bias)


def subset_rows(lm, vocab: torch.Tensor):
    """The runtime's own LM head restricted to `vocab`'s rows (vocab_rows), softcapped as
    LayeredModel.head is."""
    proj = vocab_rows(lm, vocab, lm.lm_head.weight, getattr(lm.lm_head, "bias", None))
    cap = lm.adapter.logit_softcap
    return proj if cap is None else (lambda x: torch.tanh(proj(x) / cap) * cap)


def _quantised_rows(lm, vocab: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None):
    """In int4 mode, for a draft head that reads the runtime's own LM head (not a tuned copy) where that
    head runs from the checkpoint's blocks, the same kernel on the subset's rows: the Q8_0 codes on the
    int8 kernel (~4x fewer bytes than fp32 rows: a 4096-token draft head reads 2.4 instead of 9.4 MB
    per draft on the default model), K-quant blocks (models/kquants.py) on the K-quant kernel, the
    rows' stored blocks taken as they are. None otherwise (the caller keeps fp32 rows)."""
    if lm.weights != "int4":
        return None
    n = rows.shape[0]
    pad = -n % 16  # the kernels work in tiles of 16 rows: zero rows (zero blocks decode to 0) fill the last
    if lm.head_blocks is not None:
        b = lm.head_blocks
        raw = b.raw[vocab.cpu()]  # (N, bytes per row): the subset's blocks as stored
        proj = QuantLinear([GGUFBlocks(b.kind, b.type_id, torch.cat([raw, raw.new_zeros(pad, raw.shape[1])]),
                                       b.in_features)])
    elif isinstance(lm._head, Q8Linear):
        proj = Q8Linear.from_weight(torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]), None)
        if proj is None:
            return None
    else:
        return None
    return _Rows(proj, n, bias)


class _Rows:
    """A product over N rows packed padded to whole 16-row tiles: (..., C) -> (..., N), plus the bias."""

    def __init__(self, proj, n: int, bias: torch.Tensor | None):
        self.proj, self.n, self.bias = proj, n, bias

    @property
    def nbytes(self) -> int:
        return self.proj.nbytes  # the padding rows (< 16) are read too

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)[..., : self.n]
        return y + self.bias if self.bias is not None else y


# ---------------------------------------------------------------------------------------------
def draft_vocabulary(model, n: int | list[int], bundle=None) -> torch.Tensor:
    """(N,) long ids: the N most frequent tokens (+ EOS / special tokens), or an explicit id list."""
    lm = model.lm
    if isinstance(n, (list, tuple)):
        ids = sorted({int(i) for i in n})
        if not ids or ids[0] < 0 or ids[-1] >= lm.vocab_size:
            raise ValueError(f"draft_vocab ids must be in 0..{lm.vocab_size - 1}")
        return torch.tensor(ids, device=lm.device)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"draft_vocab must be a positive number of tokens, got {n!r}")
    if n >= lm.vocab_size:
        return torch.arange(lm.vocab_size, device=lm.device)
    ranked = None
    if bundle is not None:
        ranked = bundle.config.training.get("token_frequencies")
    if ranked is None:
        ranked = corpus_token_ranking(model.tokenizer)
    keep: list[int] = list(_special_ids(model.tokenizer))
    seen = set(keep)
    for t in ranked:
        if len(keep) >= n:
            break
        if 0 <= t < lm.vocab_size and t not in seen:
            keep.append(t)
            seen.add(t)
    # A corpus smaller than N: fill with the lowest ids (BPE ids grow with merge order, a rough
    # frequency order).
    t = 0
    while len(keep) < n and t < lm.vocab_size:
        if t not in seen:
            keep.append(t)
            seen.add(t)
        t += 1
    return torch.tensor(sorted(keep), device=lm.device)


def _special_ids(tokenizer) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def corpus_token_ranking(tokenizer, per_set: int = 400) -> list[int]:
    """Token ids by frequency in the train split of the shared prompt sets (prompts + references)."""
    key = f"{type(tokenizer).__name__}-{len(tokenizer)}-{getattr(tokenizer, 'name_or_path', '')}"
    path = cache_dir() / "token_rankings" / (key.replace("/", "_") + f"-{per_set}.json")
    if path.is_file():
        return json.loads(path.read_text())
    try:
        prompts = mixed_prompts("train", per_set)
    except FileNotFoundError:
        return []
    counts: Counter = Counter()
    for p in prompts:
        for text in (p.text, p.reference):
            if text:
                counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    ranked = [t for t, _ in counts.most_common()]
    _atomic_write(path, json.dumps(ranked))
    return ranked


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
