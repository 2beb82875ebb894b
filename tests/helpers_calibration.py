"""Test helpers for calibration / eval-heads: a tiny model saved as a folder, a small prompt file."""

from __future__ import annotations

from pathlib import Path

from conftest import save_tiny_model  # noqa: F401 - re-exported for the calibration / eval-heads tests


def write_prompt_file(path: Path, n: int = 20) -> Path:
    """n plain-text prompts, one JSON string per line (the held-out split is the last 20%)."""
    path.write_text("".join(f'"Tell me about item {i} and why it matters."\n' for i in range(n)))
    return path
