"""`exitspec eval-heads`: per-exit KL, perplexity, agreement and coverage on held-out text
(calibration/evaluate.py): results.csv, results.json and layer_sweep.png."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from exitspec.calibration.evaluate import evaluate_heads, format_table, plot_layer_sweep, write_csv
from exitspec.commands.common import add_model_args, load_model
from exitspec.commands.heldout import add_data_args, data_info, resolve_bundle, sequences_from_args
from exitspec.heads.bundle import HeadBundle


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for results.csv, results.json and layer_sweep.png")
    p.add_argument("--compare-norm-lm", action="store_true",
                   help="also evaluate the parameter-free norm_lm (logit lens) at the same layers")
    add_model_args(p)
    add_data_args(p, num_prompts=20, max_new_tokens=64)


def run(args: argparse.Namespace) -> int:
    if args.heads is None:
        raise ValueError("--heads is required: a bundle folder, 'default', or 'norm_lm[:4,8,12]'")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    t0 = time.perf_counter()
    model = load_model(args)
    bundle = resolve_bundle(model, args.heads)
    baseline = None
    if args.compare_norm_lm:
        if all(k == "norm_lm" for k in bundle.config.head_kinds.values()):
            print("the bundle is norm_lm already; --compare-norm-lm adds nothing", file=sys.stderr)
        else:
            baseline = HeadBundle.create(model.lm, bundle.layers, "norm_lm", base_model=model.name)
    seqs = sequences_from_args(model, args, "eval")
    info = data_info(args, seqs, "eval")
    print(f"evaluating exits {bundle.layers} on {info['n_sequences']} held-out sequences, {info['n_tokens']} "
          f"scored tokens ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows = evaluate_heads(model, bundle, seqs, baseline=baseline)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    meta = {"model": model.name, "heads": args.heads, "data": info, "seconds": time.perf_counter() - t0,
            "bundle": bundle.describe(), "rows": rows}
    (out / "results.json").write_text(json.dumps(meta, indent=2))
    plot_layer_sweep(rows, out / "layer_sweep.png", title=f"{model.name}: exit heads ({args.heads}), "
                     f"{info['n_tokens']} held-out tokens")
    print(format_table(rows))
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'layer_sweep.png'} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0
