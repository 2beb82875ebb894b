"""Evaluating exit heads on held-out text (the `exitspec eval-heads` command is commands/eval_heads.py).

    from exitspec.calibration.evaluate import evaluate_heads
    rows = evaluate_heads(model, bundle, sequences, baseline=norm_lm_bundle)   # list[dict]

Per exit layer (one teacher forward per sequence serves every exit and the baseline):
  kl          mean KL(p_full || p_exit) in nats
  ce, ppl     cross-entropy / perplexity of the sequence's next tokens (the labels: the full model's
              greedy tokens, or reference text)
  agreement   share of tokens where the exit's top-1 equals the full model's top-1
  accuracy    share where the exit's top-1 equals the label
  coverage    share of tokens passing the exit's calibrated threshold, and agreement_at_threshold
              the agreement among those (empty when the bundle is not calibrated)
A "full" row (layer = L) gives the full model on the same tokens. `exitspec eval-heads` writes
results.csv, results.json and layer_sweep.png (x = layer; the norm_lm baseline dashed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from exitspec.calibration.collect import collect, training_temperature
from exitspec.calibration.thresholds import coverage_at

COLUMNS = ["bundle", "layer", "layers_run", "depth", "kind", "n_tokens", "kl", "ce", "ppl", "agreement", "accuracy",
           "top5_agreement", "top5_accuracy", "train_temperature", "kl_at_train_temperature",
           "mean_max_prob", "threshold_score", "threshold_value", "coverage", "agreement_at_threshold"]


def _mean(t) -> float:
    return float(t.double().mean())


def summarize(collected, bundles: dict, num_layers: int) -> list[dict]:
    """Collected per-token stats (calibration.collect) -> one row per (bundle, exit) + the full model."""
    rows = []
    for name, bundle in bundles.items():
        for layer, tok in collected.exits[name].items():
            ce = _mean(tok.ce)
            # layers_run: a block head (heads/block.py) adds a layer of its own after the exit
            row = {"bundle": name, "layer": layer, "layers_run": bundle.head(layer).layers_run,
                   "depth": layer / num_layers,
                   "kind": bundle.config.head_kinds.get(str(layer), ""), "n_tokens": tok.n,
                   "kl": _mean(tok.kl), "ce": ce, "ppl": math.exp(min(ce, 700.0)),
                   "agreement": _mean(tok.agree), "accuracy": _mean(tok.correct),
                   "top5_agreement": _mean(tok.agree5), "top5_accuracy": _mean(tok.correct5),
                   "train_temperature": training_temperature(bundle), "kl_at_train_temperature": _mean(tok.kl_t),
                   "mean_max_prob": _mean(tok.scores["max_prob"]),
                   "threshold_score": "", "threshold_value": None, "coverage": None, "agreement_at_threshold": None}
            th = bundle.threshold(layer)
            if th is not None and th.get("score") in tok.scores:
                cov, agr = coverage_at(tok.scores[th["score"]], tok.agree, th["score"], float(th["value"]))
                row.update(threshold_score=th["score"], threshold_value=float(th["value"]), coverage=cov,
                           agreement_at_threshold=agr)
            rows.append(row)
    full = collected.full
    ce = _mean(full.ce)
    rows.append({"bundle": "full", "layer": num_layers, "layers_run": num_layers, "depth": 1.0, "kind": "full",
                 "n_tokens": int(full.ce.numel()),
                 "kl": 0.0, "ce": ce, "ppl": math.exp(min(ce, 700.0)), "agreement": 1.0,
                 "accuracy": _mean(full.correct), "top5_agreement": 1.0, "top5_accuracy": _mean(full.correct5),
                 "train_temperature": None, "kl_at_train_temperature": 0.0, "mean_max_prob": None,
                 "threshold_score": "",
                 "threshold_value": None, "coverage": 1.0, "agreement_at_threshold": 1.0})
    return rows


def evaluate_heads(model, bundle, sequences, *, baseline=None, label: str = "heads",
                   progress: bool = False) -> list[dict]:
    """Evaluate every exit of `bundle` (and of a `baseline` bundle, e.g. norm_lm) on `sequences`.

    `model` is a LoadedModel or LayeredModel; sequences are runtime.sequences.TokenSequence
    (build them with greedy_sequences / reference_sequences over heldout_prompts("eval", n)).
    """
    bundles = {label: bundle}
    if baseline is not None:
        bundles["norm_lm"] = baseline
    return evaluate_bundles(model, bundles, sequences, progress=progress)


def evaluate_bundles(model, bundles: dict, sequences, *, progress: bool = False) -> list[dict]:
    """Every exit of every bundle ({label: HeadBundle}, e.g. many checkpoints) on `sequences`, from
    one teacher forward per sequence."""
    lm = getattr(model, "lm", model)
    collected = collect(lm, bundles, sequences, progress=progress)
    return summarize(collected, bundles, lm.num_layers)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                        for k in COLUMNS})


def plot_layer_sweep(rows: list[dict], path: Path, title: str = "") -> None:
    """Three panels over the layers a token runs to reach each exit (its cost): KL, perplexity (log),
    and agreement / accuracy / coverage. Written as `path` (PNG) and the same name .pdf."""
    import matplotlib  # optional (the bench extra): only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional (the bench extra)
    from matplotlib.ticker import MaxNLocator  # optional (the bench extra)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("kl", "KL(p_full || p_exit) [nats]", False), ("ppl", "perplexity of labels", True),
              (None, "rate", False)]
    rate_metrics = [("agreement", "C0"), ("accuracy", "C1"), ("coverage", "C2")]
    full = next((r for r in rows if r["bundle"] == "full"), None)
    names = [n for n in dict.fromkeys(r["bundle"] for r in rows) if n != "full"]
    trained = [n for n in names if n != "norm_lm"]
    for ax, (metric, ylabel, log) in zip(axes, panels, strict=True):
        for name in names:
            sub = sorted((r for r in rows if r["bundle"] == name), key=lambda r: r["layers_run"])
            # One line style and marker per bundle (colours tell the metrics apart in the rate panel).
            i = trained.index(name) if name in trained else -1
            style, marker = ("--", "x") if i < 0 else (("-", "-.", ":")[i % 3], "osD^v"[i % 5])
            xs = [r["layers_run"] for r in sub]
            for m, color in ([(metric, f"C{max(i, 0) + 3 * (i < 0)}")] if metric else rate_metrics):
                pts = [(x, r[m]) for x, r in zip(xs, sub, strict=True) if r[m] is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker=marker, ms=4, color=color,
                            label=f"{m} ({name})")
        if metric == "ppl" and full:
            ax.axhline(full["ppl"], color="k", lw=0.8, ls=":", label="full model")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layers run to the exit")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].set_ylim(-0.02, 1.02)
    fig.suptitle(title or "exit heads: layer sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.savefig(Path(path).with_suffix(".pdf"))
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"{'bundle':<8} {'layer':>5} {'KL':>8} {'KL@T':>8} {'ppl':>10} {'agree':>7} {'agree5':>7} {'acc':>7} "
             f"{'acc5':>7} {'coverage':>9} {'agr@thr':>8}"]
    for r in rows:
        lines.append(f"{r['bundle']:<8} {r['layer']:>5} {r['kl']:>8.3f} {r['kl_at_train_temperature']:>8.3f} "
                     f"{r['ppl']:>10.2f} {r['agreement']:>7.1%} {r['top5_agreement']:>7.1%} {r['accuracy']:>7.1%} "
                     f"{r['top5_accuracy']:>7.1%} {f(r['coverage'], '>9.1%')} "
                     f"{f(r['agreement_at_threshold'], '>8.1%')}")
    return "\n".join(lines)
