"""Held-out token sequences for calibration and evaluation (the sequence type and the teacher forward
over it live in runtime/sequences.py).

A sequence is a prompt followed by a continuation; only the continuation is scored, because that is
the distribution decoders see. The continuation is either the base model's own greedy answer
(default: then "the label" is the full model's greedy token) or a reference answer from the data.

Calibration and evaluation must not score the same prompts, or the reported coverage at a threshold
would be measured on the data that chose it: both read the held-out split of the prompt sets (never
used for training heads), calibration its even records and evaluation its odd records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from exitspec.decoding.api import encode_prompt, generate
from exitspec.prompts import PARTS, Prompt, interleave, load_prompts, prompt_sets
from exitspec.runtime.sequences import TokenSequence, scored_sequence


def heldout_prompts(part: str, n: int, prompts_file: str | Path | None = None,
                    data_dir: str | Path | None = None) -> list[Prompt]:
    """Up to n held-out prompts for `part` ("calibrate" or "eval"), interleaved across prompt sets.

    With prompts_file, that file's held-out split; otherwise the shared public sets (chat, code, math,
    roleplay; the starter set shipped with exitspec where they are absent), taking records of one
    parity so the two parts never overlap.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    if n < 1:
        raise ValueError(f"the number of prompts must be at least 1, got {n}")
    if prompts_file is not None:
        sets = [load_prompts(prompts_file, split="heldout", max_chars=1500)]
    else:
        sets = prompt_sets("heldout", data_dir)
    out = interleave([s[PARTS[part]::2] for s in sets])
    if not out:
        src = prompts_file or "the shared prompt sets"
        raise ValueError(f"{src} has no held-out prompts for {part} (the held-out split is the last 20% of a "
                         "file, split in two by record parity); use a larger prompt file")
    return out[:n]


def greedy_sequences(model, prompts: list[Prompt], max_new_tokens: int = 64, batch_size: int = 8,
                     chat: bool = True) -> list[TokenSequence]:
    """Prompt + the base model's own greedy answer (vanilla decoding), one sequence per prompt."""
    if not prompts:
        raise ValueError("no prompts to build sequences from")
    enc = [encode_prompt(model.tokenizer, p.text, chat) for p in prompts]
    seqs = []
    for i in range(0, len(enc), batch_size):
        chunk = enc[i:i + batch_size]
        out = generate(model, None, prompt_ids=chunk, max_new_tokens=max_new_tokens)
        seqs += [scored_sequence(p + g, len(p)) for p, g in zip(chunk, out.token_ids, strict=True) if g]
    return seqs


def reference_sequences(model, prompts: list[Prompt], max_answer_tokens: int = 256,
                        chat: bool = True) -> list[TokenSequence]:
    """Prompt + its reference answer from the data set, for prompts that have one."""
    seqs = []
    for p in prompts:
        if not p.reference.strip():
            continue
        ids = encode_prompt(model.tokenizer, p.text, chat)
        ans = model.tokenizer(p.reference, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        if ans:
            seqs.append(scored_sequence(ids + ans, len(ids)))
    if not seqs:
        raise ValueError("none of these prompts has a reference answer; use greedy continuations instead")
    return seqs


def text_sequences(tokenizer, path: str | Path, max_tokens: int = 256, n: int = 20) -> list[TokenSequence]:
    """Up to n windows of plain text from a local file, for out-of-domain evaluation: a .txt file's
    paragraphs, or the `text` of each JSONL / JSON record (else its prompt and reference answer).
    Each window is scored from its second token on (the first has no context to predict it from)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    if path.suffix == ".txt":
        texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    else:
        texts = [(p.text + "\n\n" + p.reference).strip() for p in load_prompts(path, split="all")]
    seqs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][: max_tokens + 1]
        if len(ids) >= 2:
            seqs.append(scored_sequence(ids, 1))
        if len(seqs) == n:
            break
    if not seqs:
        raise ValueError(f"{path} holds no text of two or more tokens")
    return seqs


def save_sequences(seqs: list[TokenSequence], path: str | Path, part: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"part": part, "sequences": [{"ids": s.ids, "start": s.start} for s in seqs]}))
    os.replace(tmp, path)


def load_sequences(path: str | Path, vocab_size: int) -> tuple[list[TokenSequence], str]:
    """A file from save_sequences -> (sequences, the part they were built for)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequence file {path} does not exist; write one with --save-sequences")
    try:
        doc = json.loads(path.read_text())
        seqs = [scored_sequence([int(t) for t in r["ids"]], int(r["start"])) for r in doc["sequences"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a sequence file written by --save-sequences ({err})") from err
    if not seqs:
        raise ValueError(f"{path} holds no sequences")
    if any(t < 0 or t >= vocab_size for s in seqs for t in s.ids):
        raise ValueError(f"{path} has token ids outside this model's vocabulary; it was made for another model")
    return seqs, str(doc.get("part", ""))
