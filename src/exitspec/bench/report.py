"""The Markdown report of a run (report.md), written from its saved files only."""

from __future__ import annotations

from pathlib import Path

from exitspec.bench.datastore_facts import describe as describe_datastore
from exitspec.bench.plots import draw_all
from exitspec.bench.results import SavedResults


def _f(v, spec: str = ".2f", none: str = "–") -> str:
    if v is None or v == "":
        return none
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _ci(r: dict, key: str, spec: str) -> str:
    if r.get(key) is None:
        return "–"
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    return f"{_f(r[key], spec)} [{_f(lo, spec)}, {_f(hi, spec)}]" if lo is not None else _f(r[key], spec)


def _audit_cell(r: dict) -> str:
    if r.get("lossless_ok") is True:
        return "ok"
    if r.get("lossless_ok") is False:
        return f"**FAILED ({r.get('lossless_mismatches')})**"
    if r["name"] == "vanilla" and r["temperature"] == 0:
        # Each runtime's vanilla loop (weights mode, KV cache type) is the reference of the lossless
        # strategies on it.
        w = r.get("weights") or "dense"
        if r.get("kv_cache") not in (None, "", "model dtype"):
            w += f", {r['kv_cache']} KV"
        return "ref" if w == "dense" else f"ref ({w})"
    return "–"


def _trr(r: dict) -> str:
    if r.get("trr") is None:
        return "–"
    total = r.get("new_tokens") or 0
    share = f" ({r['trr_exited'] / total:.2f})" if total and r.get("trr_exited") is not None else ""
    return f"{_f(r['trr'])}{share}"


def _prompt_source(cfg: dict) -> str:
    if cfg.get("prompts") in (None, "", "heldout"):
        return "held-out mix of the shared prompt sets"
    return f"{cfg['prompts']}, split {cfg.get('split', '?')}"


def render(res: SavedResults, figures: list[str]) -> str:
    cfg = res.config or {}
    rows = res.rows
    ok = [r for r in rows if r.get("status") == "ok"]
    first = rows[0] if rows else {}
    lines = [f"# exitspec benchmark: {first.get('model', '?')}", ""]
    audit = res.audit or {}
    if audit.get("failed"):
        lines += [f"> **LOSSLESS AUDIT FAILED** for {', '.join(audit['failed'])}: their greedy output differs from "
                  "vanilla's (see audit.json and the `lossless_ok` column).", ""]
    elif audit.get("ran"):
        n = len(audit.get("entries", []))
        lines += [f"Lossless audit: all {n} lossless-claiming configurations produced vanilla's greedy tokens "
                  "exactly, on every prompt.", ""]
    else:
        lines += ["Lossless audit: not run (no greedy vanilla reference in this run).", ""]
    if audit.get("status") in ("interrupted", "running"):
        lines += ["> This run was interrupted; the tables hold the configurations that finished.", ""]
    lines += [f"Machine: {first.get('machine', '?')}", "",
              f"Prompts: {first.get('prompts', '?')} ({_prompt_source(cfg)}), "
              f"{first.get('max_new_tokens', '?')} new tokens each (EOS ignored), warm-up {cfg.get('warmup', '?')}, "
              f"median of {first.get('repeats', '?')} repeats per prompt. Heads: {cfg.get('heads') or 'none'}.", ""]
    if res.datastore:
        lines += [describe_datastore(res.datastore), ""]
    if cfg.get("command"):
        lines += ["Command:", "", f"    {cfg['command']}", ""]
    lines += [
        "Speedup is against the fastest of exitspec's vanilla loop (on every weights mode run) and HF `generate` "
        "in this run. weights=int4 rows run the checkpoint's own 4-bit weights (products' inputs rounded to bf16 "
        "or int8); their lossless "
        "audit is against the int4 vanilla loop, whose agreement / perplexity are against the dense fp32 model "
        "(kv_cache=float16 rows likewise, against the vanilla loop over the same fp16 KV cache). "
        "peak MiB is the process peak (a second weights mode keeps both models loaded). "
        "E[acc] = accepted drafts per verification; tau = E[acc] + 1 (the token every verification adds); "
        "rate = E[acc] / gamma (gamma = mean drafts per verification); calls/tok = full-model calls per token; "
        "overlap = sum min(p, q) of the draft exit vs the full model at the row's temperature (T=1 for greedy), "
        "TV = 1 - overlap; agreement and perplexity with 95% bootstrap intervals across prompts. "
        "HF peers' E[acc] comes from counted forward calls (exact mean, no histogram). "
        "answers = share of math (GSM8K) prompts whose final number is vanilla's. "
        "TRR (token recovery rate, lossy modes, greedy) = share of the tokens that exited early (cascade: below "
        "the top; mlp-skip: upper MLPs skipped) that are the full model's top-1 on the same prefix; the share "
        "of tokens that exited early is in brackets.", "",
        "| configuration | tok/s | speedup | TTFT s | E[acc] | tau | rate | TRR | calls/tok | layers/tok | overlap "
        "| TV | peak MiB | lossless | agreement | answers | perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for r in ok:
        lines.append(
            f"| {r['label']} | {_f(r.get('tokens_per_s'), '.1f')} | {_f(r.get('speedup'))}x | "
            f"{_f(r.get('ttft_s'), '.3f')} | {_f(r.get('mean_accepted'))} | {_f(r.get('mean_accept_length'))} | "
            f"{_f(r.get('acceptance_rate'))} | {_trr(r)} | {_f(r.get('target_calls_per_token'))} | "
            f"{_f(r.get('layers_per_token'), '.1f')} | {_f(r.get('overlap'))} | {_f(r.get('tv'))} | "
            f"{_f(r.get('peak_mem_mib'), '.0f')} | {_audit_cell(r)} | {_ci(r, 'agreement', '.3f')} | "
            f"{_f(r.get('answer_agreement'))} | {_ci(r, 'perplexity', '.2f')} |")
    predicted = [r for r in ok if r.get("predicted_speedup") is not None]
    if predicted:
        lines += ["", "## Cost model: predicted vs measured", "",
                  "Predicted: the parts of one self-spec cycle timed alone on a warm cache at the run's typical "
                  "context, with the row's measured E[acc] (Leviathan et al.: vanilla step x (E[acc] + 1) / cycle). "
                  "Lookup, tree and hybrid: each verification after the first priced as forward x cost + host, "
                  "tokens/s = sum(accepted + 1) / sum(cycle); forward = the vanilla loop's 1-row forward as run "
                  "(its decode step less its host work); cost = the verification in 1-row forwards timed alone "
                  "(lookup: K + 1 rows on the row-cost curve; tree: its nodes on the position-cost table; hybrid: "
                  "lookup cycles as lookup, head cycles of K drafts as a self-spec cycle of K timed alone); host = "
                  "the row's own time per step outside the model's forwards, accounted by the engine around each "
                  "step (drafting, argmax, bookkeeping), priced apart from the forwards. The cycle column: the "
                  "predicted cycle in ms (mean verified rows or nodes; host ms per cycle). "
                  "Measured: decode-phase tokens/s (after the first step) over the vanilla loop's, same runtime and "
                  "temperature. A gap over 10% names which side moved.", "",
                  "| configuration | cycle ms | vanilla step ms | E[acc] | predicted | measured (decode) | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in predicted:
            cycle = _f(r.get('cycle_ms'), '.2f')
            if r.get("host_ms") is not None:
                cycle += f" ({_f(r.get('mean_verified_rows'), '.2f')} rows; host {_f(r.get('host_ms'), '.2f')})"
            lines.append(f"| {r['label']} | {cycle} | {_f(r.get('vanilla_step_ms'), '.2f')} | "
                         f"{_f(r.get('mean_accepted'))} | {_f(r['predicted_speedup'])}x | "
                         f"{_f(r.get('measured_decode_speedup'))}x | {r.get('prediction_note') or 'within 10%'} |")
    routed = [r for r in ok if r.get("routing")]
    if routed:
        lines += ["", "## Cascade routing", "",
                  "Tokens each exit emitted (teacher-forced routing of the run's own outputs, exact for cascade), "
                  "how often that exit's top-1 is the full model's, and the full model's perplexity of them "
                  "(the model's layer count = the full model).", "",
                  "| configuration | layer | tokens | share | top-1 agreement | perplexity |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in routed:
            table = r["routing"]
            total = sum(v["tokens"] for v in table.values()) or 1
            for layer, v in table.items():
                lines.append(f"| {r['label']} | {layer} | {v['tokens']} | {v['tokens'] / total:.2f} | "
                             f"{v['top1_agreement']:.3f} | {v['perplexity']:.2f} |")
    split = [r for r in ok if isinstance(r.get("cost_split"), dict)]
    if split:
        lines += ["", "## Where the work goes (layer-equivalents per token)", "",
                  "From counts the strategies keep (layers run, exit histogram, the gates' LM-head rows), one "
                  "decoder layer for one token = 1; an LM-head row costs the head's parameters over a layer's. "
                  "path = layers run before the token was emitted; recomputed = run after it (cascade's deferred "
                  "layers, batched, so cheaper than their count on a memory-bound CPU); skipped = never run; "
                  "gates = exits' pre-check and LM heads; head = final LM head; adapt = per-request threshold "
                  "adaptation; vs vanilla = total over vanilla's layers + head (a cost model, not a timing).", "",
                  "| configuration | path | recomputed | skipped | gates | head | adapt | total | vs vanilla |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in split:
            c = r["cost_split"]
            cells = [_f(c.get(k)) for k in ("path", "recomputed", "skipped", "gates", "head", "adapt", "total")]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_f(c.get('vs_vanilla'))}x |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "Configurations that did not run:", ""]
        lines += [f"- {r['label']}: {r.get('status')}" for r in failed]
    cats = sorted({c["category"] for c in res.categories})
    if len(cats) > 1:
        lines += ["", "## Speedup by prompt category", "",
                  "| configuration | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
        by = {(c["label"], c["category"]): c for c in res.categories}
        for r in ok:
            cells = [_f(by.get((r["label"], c), {}).get("speedup")) for c in cats]
            lines.append(f"| {r['label']} | " + " | ".join(f"{x}x" if x != "–" else x for x in cells) + " |")
        spec_rows = [r for r in ok if r.get("mean_accepted") is not None]
        if spec_rows:
            lines += ["", "E[accepted drafts] per verification by category (+1 for tokens per verification):", "",
                      "| configuration | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
            for r in spec_rows:
                cells = [_f(by.get((r["label"], c), {}).get("mean_accepted")) for c in cats]
                lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    captions = {
        "layer_sweep": "Exit quality by layer: KL to the full model, perplexity, top-1 agreement.",
        "acceptance_sweep": "Acceptance by exit layer: E[accepted], acceptance rate, and draft/target TV.",
        "pareto": "Speedup vs quality, points labelled by exit layer (bars: 95% bootstrap intervals).",
        "threshold_pareto": "Speed vs quality of the lossy modes at each threshold (the threshold sweep), "
                            "vanilla as the reference point.",
        "acceptance_hist": "Accepted drafts per verification.",
        "exit_distribution": "Which layer chose each token.",
    }
    if figures:
        lines += ["", "## Figures", ""]
        for name in figures:
            lines += [f"![{name}]({name}.png)", "", f"{captions.get(name, name)} ([PDF]({name}.pdf))", ""]
    lines += ["", "Files: results.csv (one row per configuration), results.jsonl (per prompt), categories.csv, "
              "layers.csv (layer sweep), audit.json, config.json. Redraw: `exitspec bench --replot <this folder>`."]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, figures: list[str]) -> Path:
    out = Path(out)
    path = out / "report.md"
    path.write_text(render(SavedResults(out), figures))
    return path


def finish(out: Path) -> list[str]:
    """Plots and report from the saved files."""
    figures = draw_all(out)
    write_report(out, figures)
    return figures
