"""The files of a benchmark run, written row by row so an interrupted run keeps what it finished.

    results.csv      one row per configuration: settings, machine, speed, acceptance, quality, audit
    results.jsonl    one line per (configuration, prompt): times, tokens, acceptance, agreement, text
    categories.csv   one row per (configuration, prompt category): tokens/s, speedup, acceptance
    layers.csv       the teacher-forced layer sweep (per exit reading and layer: KL, perplexity, ...)
    audit.json       the lossless audit: every lossless-claiming configuration and its mismatches
    config.json      the BenchConfig and command line that produced all of the above

Plots and the report read only these files (`exitspec bench --replot DIR`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

COLUMNS = [
    # settings
    "label", "name", "weights", "kv_cache", "options", "exit_layer", "gamma", "threshold", "temperature",
    "max_new_tokens",
    "prompts", "repeats", "model", "heads", "machine",
    # speed
    "new_tokens", "tokens_per_s", "tokens_per_s_prompt_median", "baseline", "baseline_tokens_per_s", "speedup",
    "ttft_s", "peak_mem_mib", "mem_source",
    # speculation and depth
    "mean_accepted", "gamma_mean", "acceptance_rate", "mean_accept_length", "target_calls_per_token",
    "layers_per_token", "exit_hist", "routing", "draft_reading", "top1_agreement", "overlap", "tv",
    "overlap_temperature", "trr", "trr_exited", "cost_split",
    # the cost model (bench/prediction.py: self-spec, lookup, tree and hybrid rows)
    "predicted_speedup", "measured_decode_speedup", "cycle_ms", "vanilla_step_ms", "cost_context", "prediction_note",
    "mean_verified_rows", "host_ms", "head_cycles",
    # quality and audit
    "lossless_claim", "lossless_ok", "lossless_mismatches", "agreement", "agreement_lo", "agreement_hi",
    "answer_agreement", "answer_prompts",
    "perplexity", "perplexity_lo", "perplexity_hi",
    "status",
]
CATEGORY_COLUMNS = ["label", "name", "exit_layer", "gamma", "temperature", "category", "prompts", "tokens_per_s",
                    "speedup", "ttft_s", "mean_accepted", "mean_accept_length", "acceptance_rate",
                    "target_calls_per_token", "layers_per_token", "agreement"]
LAYER_COLUMNS_BASE = ["reading", "layer", "positions", "kl", "perplexity", "top1_agreement"]


class _CsvAppender:
    """A CSV file with a fixed header; each row is flushed and synced as soon as it is written."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(columns)

    def write(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.path.name}: unknown columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: _cell(row.get(k)) for k in self.columns})
            f.flush()
            os.fsync(f.fileno())


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.10g}"
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return v


class ResultsWriter:
    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.rows = _CsvAppender(out / "results.csv", COLUMNS)
        self.categories = _CsvAppender(out / "categories.csv", CATEGORY_COLUMNS)
        self.prompts_path = out / "results.jsonl"
        self.prompts_path.write_text("")

    def write_row(self, row: dict, per_prompt: list[dict], per_category: list[dict]) -> None:
        # Per-prompt lines first: a row in results.csv implies its prompts are on disk.
        with open(self.prompts_path, "a") as f:
            for rec in per_prompt:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for c in per_category:
            self.categories.write(c)
        self.rows.write(row)

    def write_layers(self, rows: list[dict]) -> None:
        extra = sorted({k for r in rows for k in r} - set(LAYER_COLUMNS_BASE))
        app = _CsvAppender(self.out / "layers.csv", LAYER_COLUMNS_BASE + extra)
        for r in rows:
            app.write(r)

    def write_json(self, name: str, obj) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, self.out / name)


# --- reading (plots, report) -----------------------------------------------------------------------
def _parse(v: str):
    if v == "":
        return None
    if v[0] in "[{":
        return json.loads(v)
    if v in ("True", "False"):
        return v == "True"
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by an interrupt: keep everything before it
    return out


class SavedResults:
    """Everything a finished (or interrupted) run left in its folder."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if not (self.out / "results.csv").is_file():
            raise FileNotFoundError(f"{self.out} holds no results.csv; run `exitspec bench --out {self.out}` first")
        self.rows = read_csv(self.out / "results.csv")
        self.categories = read_csv(self.out / "categories.csv")
        self.layers = read_csv(self.out / "layers.csv")
        self.prompts = read_jsonl(self.out / "results.jsonl")
        self.audit = _read_json(self.out / "audit.json")
        self.config = _read_json(self.out / "config.json")
        self.datastore = _read_json(self.out / "datastore.json")  # bench/datastore_facts.py, when lookup ran


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
