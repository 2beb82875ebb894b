"""Held-out token sequences for calibration and evaluation, and the one teacher forward over them.

A sequence is a prompt followed by a continuation; only the continuation is scored, because that is
the distribution decoders see. The continuation is either the base model's own greedy answer
(default: then "the label" is the full model's greedy token) or a reference answer from the data.

Calibration and evaluation must not score the same prompts, or the reported coverage at a threshold
would be measured on the data that chose it: both read the held-out split of the prompt sets (never
used for training heads), calibration its even records and evaluation its odd records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from exitspec.prompts import DEFAULT_SETS, Prompt, load_prompts, shared_data_dir
from exitspec.runtime.layered import LayeredModel

PARTS = {"calibrate": 0, "eval": 1}  # record parity inside the held-out split


@dataclass
class EvalSequence:
    """Token ids whose positions start..len-1 are scored (predicted from positions start-1..len-2)."""

    ids: list[int]
    start: int

    def __post_init__(self):
        if not 1 <= self.start < len(self.ids):
            raise ValueError(f"a sequence needs a prompt and at least one scored token (start={self.start}, "
                             f"len={len(self.ids)})")

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.start


def heldout_prompts(part: str, n: int, prompts_file: str | Path | None = None,
                    data_dir: str | Path | None = None) -> list[Prompt]:
    """Up to n held-out prompts for `part` ("calibrate" or "eval"), interleaved across prompt sets.

    With prompts_file, that file's held-out split; otherwise the shared public sets (chat, code, math,
    roleplay), taking records of one parity so the two parts never overlap.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    if n < 1:
        raise ValueError(f"the number of prompts must be at least 1, got {n}")
    if prompts_file is not None:
        files = [Path(prompts_file)]
    else:
        root = Path(data_dir) if data_dir else shared_data_dir()
        if root is None or not root.is_dir():
            raise FileNotFoundError("no prompt data folder found; pass --prompts FILE")
        files = [root / rel for rel in DEFAULT_SETS if (root / rel).is_file()]
    sets = [load_prompts(f, split="heldout", max_chars=1500)[PARTS[part]::2] for f in files]
    out: list[Prompt] = []
    for i in range(max((len(s) for s in sets), default=0)):
        out.extend(s[i] for s in sets if i < len(s))
    if not out:
        src = prompts_file or "the shared prompt sets"
        raise ValueError(f"{src} has no held-out prompts for {part} (the held-out split is the last 20% of a "
                         "file, split in two by record parity); use a larger prompt file")
    return out[:n]


def greedy_sequences(model, prompts: list[Prompt], max_new_tokens: int = 64, batch_size: int = 8,
                     chat: bool = True) -> list[EvalSequence]:
    """Prompt + the base model's own greedy answer (vanilla decoding), one sequence per prompt."""
    from exitspec.decoding.api import encode_prompt, generate

    if not prompts:
        raise ValueError("no prompts to build sequences from")
    enc = [encode_prompt(model.tokenizer, p.text, chat) for p in prompts]
    seqs = []
    for i in range(0, len(enc), batch_size):
        chunk = enc[i:i + batch_size]
        out = generate(model, None, prompt_ids=chunk, max_new_tokens=max_new_tokens)
        seqs += [EvalSequence(p + g, len(p)) for p, g in zip(chunk, out.token_ids, strict=True) if g]
    return seqs


def reference_sequences(model, prompts: list[Prompt], max_answer_tokens: int = 256,
                        chat: bool = True) -> list[EvalSequence]:
    """Prompt + its reference answer from the data set, for prompts that have one."""
    from exitspec.decoding.api import encode_prompt

    seqs = []
    for p in prompts:
        if not p.reference.strip():
            continue
        ids = encode_prompt(model.tokenizer, p.text, chat)
        ans = model.tokenizer(p.reference, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        if ans:
            seqs.append(EvalSequence(ids + ans, len(ids)))
    if not seqs:
        raise ValueError("none of these prompts has a reference answer; use greedy continuations instead")
    return seqs


@torch.inference_mode()
def teacher_forward(lm: LayeredModel, seq: EvalSequence, layers: list[int]) -> tuple[torch.Tensor, dict]:
    """One full forward over a sequence (training.teacher.teacher_pass), sliced to its scored rows.

    Returns (full logits (N, V), {layer: hidden (N, C)}) at the N = seq.n_scored predicting positions
    start-1..len-2, i.e. row j predicts token ids[start + j].
    """
    from exitspec.training.teacher import teacher_pass

    rows = slice(seq.start - 1, len(seq.ids) - 1)
    tp = teacher_pass(lm, torch.tensor([seq.ids]), layers, logits_from=seq.start - 1)
    return tp.logits[0, :-1], {layer: h[0, rows] for layer, h in tp.hidden.items()}
