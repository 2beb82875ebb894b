"""Shared helpers for the head/training tests: tiny data sets and a tiny model saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exitspec.runtime.sequences import TokenSequence


def random_examples(n: int = 16, length: int = 20, prompt_len: int = 5, seed: int = 0) -> list[TokenSequence]:
    g = torch.Generator().manual_seed(seed)
    return [TokenSequence(torch.randint(0, 90, (length,), generator=g).tolist(), prompt_len) for _ in range(n)]


def write_chat_jsonl(path: Path, n: int = 20) -> Path:
    """ShareGPT-style records with short user turns and replies."""
    with open(path, "w") as f:
        for i in range(n):
            conv = [{"from": "human", "value": f"say {i} twice"}, {"from": "gpt", "value": f"{i} {i}."}]
            f.write(json.dumps({"id": str(i), "conversations": conv}) + "\n")
    return path


