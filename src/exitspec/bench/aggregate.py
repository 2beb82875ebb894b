"""A configuration's results pooled over its prompts: the row of results.csv and its per-category rows.

Pure functions of the per-prompt records (bench/runner.py builds them as it times each prompt), so
that the report's numbers come from one place and can be recomputed from results.jsonl.
"""

from __future__ import annotations

from collections import defaultdict

from exitspec.bench import metrics
from exitspec.bench.config import RunSpec
from exitspec.bench.contenders import Sample


def aggregate_row(per_prompt: list[dict], samples: list[Sample], bootstrap: int, seed: int) -> dict:
    """One configuration's row: throughput, TTFT, calls and layers per token, acceptance, and quality
    against the reference (agreement, GSM8K answers, perplexity with bootstrap intervals), pooled over
    its prompts."""
    tokens = [len(s.tokens) for s in samples]
    row = {"new_tokens": sum(tokens),
           "tokens_per_s": metrics.throughput(tokens, [s.total_s for s in samples]),
           "tokens_per_s_prompt_median": metrics.median([r["tokens_per_s"] for r in per_prompt]),
           "ttft_s": metrics.median([s.ttft_s for s in samples if s.ttft_s is not None]) if any(
               s.ttft_s is not None for s in samples) else None,
           "target_calls_per_token": metrics.calls_per_token(
               sum(s.target_calls for s in samples) if all(s.target_calls is not None for s in samples)
               else None, sum(tokens)),
           "layers_per_token": metrics.layers_per_token(
               sum(s.layers_computed for s in samples) if all(s.layers_computed is not None for s in samples)
               else None, sum(tokens)),
           "exit_hist": {str(k): v for k, v in metrics.merge_histograms(s.exit_hist for s in samples).items()}}
    lens = [n for s in samples for n in (s.accept_lengths or [])]
    if lens:
        drafted = sum(s.drafted for s in samples) if all(s.drafted is not None for s in samples) else None
        acc = metrics.acceptance(lens, drafted if drafted is not None else 0)
        row["mean_accepted"], row["mean_accept_length"] = acc["mean_accepted"], acc["mean_accept_length"]
        if drafted:
            row["gamma_mean"], row["acceptance_rate"] = acc["gamma_mean"], acc["acceptance_rate"]
    answers = [r["answer_agreement"] for r in per_prompt if r.get("answer_agreement") is not None]
    if answers:  # lossy modes on math prompts: is the final answer still vanilla's?
        row["answer_agreement"], row["answer_prompts"] = sum(answers) / len(answers), len(answers)
    if "agreement" in per_prompt[0]:
        row["agreement"], row["agreement_lo"], row["agreement_hi"] = metrics.bootstrap_ci(
            [r["agreement"] for r in per_prompt], bootstrap, seed=seed)
    if "nll" in per_prompt[0]:
        pairs = [(r["nll"], r["nll_tokens"]) for r in per_prompt]
        row["perplexity"], row["perplexity_lo"], row["perplexity_hi"] = metrics.bootstrap_ci(
            pairs, bootstrap, seed=seed,
            stat=lambda ps: metrics.perplexity(sum(a for a, _ in ps), sum(b for _, b in ps)))
    return row


def category_rows(spec: RunSpec, per_prompt: list[dict], base: dict[str, float]) -> list[dict]:
    """The per-category table's rows of one configuration; `base`: the baseline's tokens/s by category."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in per_prompt:
        groups[r["category"] or "-"].append(r)
    out = []
    for cat, recs in sorted(groups.items()):
        tokens = sum(r["new_tokens"] for r in recs)
        tps = metrics.throughput([r["new_tokens"] for r in recs], [r["time_s"] for r in recs])
        agr = [r["agreement"] for r in recs if r.get("agreement") is not None]
        ttft = [r["ttft_s"] for r in recs if r["ttft_s"] is not None]
        row = {"label": spec.label, "name": spec.name, "exit_layer": spec.exit_layer, "gamma": spec.gamma,
               "temperature": spec.temperature, "category": cat, "prompts": len(recs), "tokens_per_s": tps,
               "speedup": metrics.speedup(tps, base.get(cat)), "ttft_s": metrics.median(ttft) if ttft else None,
               "target_calls_per_token": _sum_per(recs, "target_calls", tokens),
               "layers_per_token": _sum_per(recs, "layers_computed", tokens),
               "agreement": sum(agr) / len(agr) if agr else None}
        if all(r["verifications"] for r in recs):
            accepted = sum(r["accepted"] for r in recs)
            row["mean_accepted"] = accepted / sum(r["verifications"] for r in recs)
            row["mean_accept_length"] = row["mean_accepted"] + 1.0
            if all(r["drafted"] for r in recs):
                row["acceptance_rate"] = accepted / sum(r["drafted"] for r in recs)
        out.append(row)
    return out


def _sum_per(recs: list[dict], key: str, tokens: int) -> float | None:
    vals = [r[key] for r in recs]
    return sum(vals) / tokens if tokens and all(v is not None for v in vals) else None


def category_tps(per_prompt: list[dict]) -> dict[str, float]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in per_prompt:
        groups[r["category"] or "-"].append(r)
    return {c: metrics.throughput([r["new_tokens"] for r in rs], [r["time_s"] for r in rs])
            for c, rs in groups.items()}
