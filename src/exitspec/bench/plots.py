"""Figures of a benchmark run, drawn only from its saved files (so `--replot DIR` redraws them).

Each figure is written as PNG (for the Markdown report) and PDF (for papers). A figure whose data
the run does not have (e.g. no speculative configuration) is skipped, not drawn empty.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from exitspec.bench.results import SavedResults


def _plt():
    import matplotlib  # optional (the bench extra)

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt  # optional (the bench extra)

    return plt


def _save(fig, out: Path, name: str, tight: bool = True) -> str:
    if tight:
        fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=130)
    _plt().close(fig)
    return name


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _series_key(r: dict) -> str:
    gamma = f" gamma={r['gamma']}" if r.get("gamma") is not None else ""
    return f"{r['name']}{gamma} T={r['temperature']:g}"


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator  # optional (the bench extra)

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _layer_axes(axes, ylabels: tuple[str, ...]) -> None:
    """The per-exit-layer panels' shared look: y labels, "exit layer" x axis with integer ticks, grid."""
    for ax, label in zip(axes, ylabels, strict=True):
        ax.set_ylabel(label)
        ax.set_xlabel("exit layer")
        ax.grid(alpha=0.3)
        _integer_x(ax)


def layer_sweep(res: SavedResults, out: Path) -> str | None:
    if not res.layers:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    by_reading: dict[str, list[dict]] = defaultdict(list)
    for r in res.layers:
        by_reading[r["reading"]].append(r)
    names = {"lens": "logit lens (model's norm + LM head)", "head": "exit head (bundle)"}
    for reading, rows in by_reading.items():
        rows.sort(key=lambda r: r["layer"])
        x = [r["layer"] for r in rows]
        for ax, key in zip(axes, ("kl", "perplexity", "top1_agreement"), strict=True):
            ax.plot(x, [r[key] for r in rows], marker="o", ms=3, label=names.get(reading, reading))
    _layer_axes(axes, ("KL(full || exit), nats", "perplexity of vanilla's text", "top-1 agreement with full model"))
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.suptitle("Exit quality by layer (teacher-forced on vanilla's generations)", fontsize=10)
    return _save(fig, out, "layer_sweep")


def acceptance_sweep(res: SavedResults, out: Path) -> str | None:
    rows = [r for r in _ok(res.rows) if r.get("exit_layer") is not None and r.get("mean_accepted") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        series[_series_key(r)].append(r)
    for key, rs in sorted(series.items()):
        rs.sort(key=lambda r: r["exit_layer"])
        x = [r["exit_layer"] for r in rs]
        axes[0].plot(x, [r["mean_accepted"] for r in rs], marker="o", ms=4, label=key)
        if any(r.get("acceptance_rate") is not None for r in rs):
            pts = [(r["exit_layer"], r["acceptance_rate"]) for r in rs if r.get("acceptance_rate") is not None]
            axes[1].plot(*zip(*pts, strict=True), marker="o", ms=4, label=key)
    lens = sorted((r for r in res.layers if r["reading"] == "lens" and "tv_T1" in r), key=lambda r: r["layer"])
    heads = sorted((r for r in res.layers if r["reading"] == "head" and "tv_T1" in r), key=lambda r: r["layer"])
    for rs, lab in ((lens, "logit lens"), (heads, "exit head")):
        if rs:
            axes[2].plot([r["layer"] for r in rs], [r["tv_T1"] for r in rs], marker="o", ms=3, label=lab)
    _layer_axes(axes, ("E[accepted drafts] per verification", "acceptance rate = E[accepted] / gamma",
                       "TV(draft, target) at T=1"))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    if lens or heads:
        axes[2].legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    return _save(fig, out, "acceptance_sweep", tight=False)


def pareto(res: SavedResults, out: Path) -> str | None:
    rows = [r for r in _ok(res.rows) if r.get("speedup") is not None]
    qual = [r for r in rows if r.get("agreement") is not None or r.get("perplexity") is not None]
    if not qual:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({r["name"] for r in qual})
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for ax, key, ylabel in ((axes[0], "agreement", "token agreement with vanilla (greedy)"),
                            (axes[1], "perplexity", "full-model perplexity of the output")):
        for r in (r for r in qual if r.get(key) is not None):
            lossless = r.get("lossless_claim") is True
            ax.scatter(r["speedup"], r[key], marker="o" if lossless else "^", s=30, color=colors[r["name"]],
                       label=r["name"])
            lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
            if lo is not None and hi is not None and hi > lo:
                ax.plot([r["speedup"]] * 2, [lo, hi], color=colors[r["name"]], lw=0.8, alpha=0.6)
            if r.get("exit_layer") is not None:
                ax.annotate(f"l={r['exit_layer']}", (r["speedup"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_ylabel(ylabel)
    return _finish_speed_panels(fig, axes, "speedup vs fastest vanilla",
                                "circles: lossless claim, triangles: lossy; l = exit layer", 5, out, "pareto")


def _finish_speed_panels(fig, axes, xlabel: str, title: str, ncol: int, out: Path, name: str) -> str:
    """What every speed-vs-quality figure ends with: vanilla's speed marked (x = 1), the x label and a
    grid on each panel, `title` over the first, one legend below them all, the figure saved as `name`."""
    for ax in axes:
        ax.axvline(1.0, color="gray", ls=":", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_title(title, fontsize=8)
    _legend_below(fig, axes, ncol=ncol)
    return _save(fig, out, name, tight=False)


def _legend_below(fig, axes, ncol: int) -> None:
    """One legend for all panels (each label once), in rows of `ncol` under them; the panels are laid
    out above it."""
    seen: dict = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(ncol, len(seen)), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(seen) - 1) // ncol), 1, 1))


def threshold_pareto(res: SavedResults, out: Path) -> str | None:
    """Speed vs quality of each lossy mode across its thresholds (bench config's threshold_sweep): x =
    tokens/s over the fastest vanilla's, y = answer agreement with vanilla on GSM8K prompts where the
    run has them (else token agreement), and the full model's perplexity of the outputs; one line per
    mode and setting, points labelled by threshold; exitspec's vanilla loop is the reference point."""
    ok = [r for r in _ok(res.rows) if r.get("speedup") is not None]
    swept = [r for r in ok if r.get("threshold") is not None and not r.get("lossless_claim")]
    if not swept:
        return None
    plt = _plt()
    quality = "answer_agreement" if any(r.get("answer_agreement") is not None for r in ok) else "agreement"
    qlabel = {"answer_agreement": "GSM8K answer agreement with vanilla",
              "agreement": "token agreement with vanilla (greedy)"}[quality]
    vanilla = [r for r in ok if r["name"] == "vanilla"]  # one reference point per runtime (dense, int4, ...)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[str, list[dict]] = defaultdict(list)
    for r in swept:  # one line per configuration but its threshold: the label without it
        key = re.sub(r"threshold=[^,\]]*,?", "", r["label"]).replace(",]", "]").replace("[]", "")
        lines[key].append(r)
    for ax, key, ylabel in ((axes[0], quality, qlabel), (axes[1], "perplexity", "full-model perplexity of the output")):
        for i, (name, rs) in enumerate(sorted(lines.items())):
            pts = sorted((r for r in rs if r.get(key) is not None), key=lambda r: r["threshold"])
            if not pts:
                continue
            ax.plot([r["speedup"] for r in pts], [r[key] for r in pts], marker="^", ms=5, color=f"C{i % 10}",
                    label=name)
            for r in pts:
                ax.annotate(f"{r['threshold']:g}", (r["speedup"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for r in (r for r in vanilla if r.get(key) is not None):
            ax.scatter([r["speedup"]], [r[key]], marker="*", s=90, color="black", zorder=3,
                       label=f"vanilla ({r.get('weights') or 'dense'})")
        ax.set_ylabel(ylabel)
    return _finish_speed_panels(fig, axes, "tokens/s over the fastest vanilla",
                                "lossy modes at each threshold (labels); star: vanilla", 4, out, "threshold_pareto")


def acceptance_histograms(res: SavedResults, out: Path, max_panels: int = 12) -> str | None:
    lens: dict[str, list[int]] = defaultdict(list)
    for rec in res.prompts:
        if rec.get("accept_lengths"):
            lens[rec["label"]].extend(rec["accept_lengths"])
    if not lens:
        return None
    plt = _plt()
    labels = sorted(lens)[:max_panels]
    cols = min(4, len(labels))
    rows_n = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.3 * cols, 2.6 * rows_n), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        v = lens[label]
        ax.hist(v, bins=range(0, max(v) + 2), align="left", rwidth=0.85)
        ax.set_title(f"{label}\nmean {sum(v) / len(v):.2f} (+1 = {sum(v) / len(v) + 1:.2f} tokens/verif.)",
                     fontsize=7)
        ax.set_xlabel("accepted drafts per verification", fontsize=7)
        _integer_x(ax)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    return _save(fig, out, "acceptance_hist")


def exit_distribution(res: SavedResults, out: Path, max_series: int = 10) -> str | None:
    rows = [r for r in _ok(res.rows) if isinstance(r.get("exit_hist"), dict) and len(r["exit_hist"]) > 1]
    if not rows:
        return None
    plt = _plt()
    rows = rows[:max_series]
    layers = sorted({int(k) for r in rows for k in r["exit_hist"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(layers) * max(1, len(rows)) / 2), 3.8))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        h = {int(k): v for k, v in r["exit_hist"].items()}
        total = sum(h.values())
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [h.get(layer, 0) / total for layer in layers], width=width, label=r["label"])
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("layer whose output chose the token")
    ax.set_ylabel("fraction of tokens")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, out, "exit_distribution")


FIGURES = (layer_sweep, acceptance_sweep, pareto, threshold_pareto, acceptance_histograms, exit_distribution)


def draw_all(out: str | Path) -> list[str]:
    """Redraw every figure of a results folder; returns the names drawn."""
    out = Path(out)
    res = SavedResults(out)
    return [name for fig in FIGURES if (name := fig(res, out))]
