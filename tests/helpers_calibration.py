"""Test helpers for calibration / eval-heads: a small prompt file (tiny model folders: conftest.save_tiny_model)."""

from __future__ import annotations

from pathlib import Path


def write_prompt_file(path: Path, n: int = 20) -> Path:
    """n plain-text prompts, one JSON string per line (the held-out split is the last 20%)."""
    path.write_text("".join(f'"Tell me about item {i} and why it matters."\n' for i in range(n)))
    return path
