"""Test helpers for calibration / eval-heads: a tiny model saved as a folder, a small prompt file."""

from __future__ import annotations

from pathlib import Path

from conftest import char_tokenizer, tiny_model


def save_tiny_model(folder: Path, family: str = "llama", layers: int = 6) -> Path:
    """A tiny random model + character tokenizer written as an HF folder, loadable by `--model`."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(family, layers=layers).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def write_prompt_file(path: Path, n: int = 20) -> Path:
    """n plain-text prompts, one JSON string per line (the held-out split is the last 20%)."""
    path.write_text("".join(f'"Tell me about item {i} and why it matters."\n' for i in range(n)))
    return path
