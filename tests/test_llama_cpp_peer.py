"""llama.cpp as a bench peer (bench/llama_cpp.py): skipped with the reason where it cannot run, options
checked, and, where a llama-server binary is at hand, timed on the real default GGUF."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import tiny_loaded
from exitspec.bench.config import BenchConfig
from exitspec.bench.llama_cpp import ENV
from exitspec.bench.runner import BenchRunner
from helpers_bench import tiny_prompts


def _statuses(tmp_path, model, runs) -> dict[str, str]:
    cfg = BenchConfig(num_prompts=1, max_new_tokens=4, repeats=1, warmup=0, quality=False, runs=runs)
    outcome = BenchRunner(cfg, model, tiny_prompts(), tmp_path, progress=False).run()
    return {r["label"]: r["status"] for r in outcome.rows}


def test_a_machine_without_llama_cpp_skips_the_peer_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server anywhere
    status = _statuses(tmp_path / "a", tiny_loaded("llama", layers=4), [{"name": "llama.cpp"}])
    assert status["llama.cpp@T0"].startswith("skipped: llama.cpp: no llama-server binary")
    assert status["vanilla@T0"] == "ok"  # the rest of the sweep runs


def test_a_model_that_is_not_a_gguf_file_skips_the_peer_and_bad_options_are_named(tmp_path, monkeypatch):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ENV, str(fake))
    status = _statuses(tmp_path / "b", tiny_loaded("llama", layers=4),
                       [{"name": "llama.cpp"}, {"name": "llama.cpp", "spec": "telepathy"},
                        {"name": "llama.cpp", "colour": 3}])
    assert status["llama.cpp@T0"].startswith("skipped: llama.cpp reads GGUF files")
    assert "spec must be one of none, draft-simple" in status["llama.cpp[spec=telepathy]@T0"]
    assert "not ['colour']" in status["llama.cpp[colour=3]@T0"]
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    assert "is not an executable llama-server" in _statuses(tmp_path / "c", tiny_loaded("llama", layers=4),
                                                           [{"name": "llama.cpp"}])["llama.cpp@T0"]


def _binary() -> str | None:
    return os.environ.get(ENV) or shutil.which("llama-server")


@pytest.mark.slow
@pytest.mark.skipif(_binary() is None, reason=f"no llama-server binary (set ${ENV} or put it on PATH)")
def test_llama_cpp_decodes_the_default_gguf_with_the_benchmarks_prompts(default_model, tmp_path):
    """Plain and n-gram speculative llama.cpp on the embedded GGUF: the whole budget, greedy tokens
    that start as exitspec's vanilla ones (two implementations of Q4_1 arithmetic may part later)."""
    from exitspec.prompts import mixed_prompts

    cfg = BenchConfig(num_prompts=2, max_new_tokens=16, repeats=1, warmup=0, quality=False,
                      runs=[{"name": "llama.cpp", "threads": 1}, {"name": "llama.cpp", "spec": "ngram-simple"}])
    outcome = BenchRunner(cfg, default_model, mixed_prompts("heldout", 1)[:2], tmp_path, progress=False).run()
    rows = {r["label"]: r for r in outcome.rows}
    for label in ("llama.cpp[threads=1]@T0", "llama.cpp[spec=ngram-simple]@T0"):
        assert rows[label]["status"] == "ok", rows[label]
        assert rows[label]["tokens_per_s"] > 0
    saved = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines() if line.strip()]
    ours = [r for r in saved if r["label"] == "llama.cpp[threads=1]@T0"]
    vanilla = [r for r in saved if r["label"] == "vanilla@T0"]
    assert len(ours) == len(vanilla) == 2 and all(r["new_tokens"] == 16 for r in ours)
    assert all(r["tokens"][:4] == v["tokens"][:4] for r, v in zip(ours, vanilla, strict=True))
