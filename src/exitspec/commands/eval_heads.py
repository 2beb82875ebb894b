"""`exitspec eval-heads`: per-exit KL, perplexity, agreement and coverage on held-out text
(calibration/evaluate.py): results.csv, results.json and layer_sweep.png."""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

from exitspec.calibration.evaluate import evaluate_bundles, format_table, plot_layer_sweep, write_csv
from exitspec.commands.common import add_model_args, load_model
from exitspec.commands.heldout import add_data_args, data_info, resolve_bundle, sequences_from_args
from exitspec.heads.bundle import CONFIG_FILE, HeadBundle


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for results.csv, results.json and layer_sweep.png")
    p.add_argument("--compare-norm-lm", action="store_true",
                   help="also evaluate the parameter-free norm_lm (logit lens) at the same layers")
    add_model_args(p)
    add_data_args(p, num_prompts=20, max_new_tokens=64)


def bundle_specs(heads: str) -> dict[str, str]:
    """--heads -> {label: spec}: one bundle (labelled "heads"), or every bundle folder a glob pattern
    such as 'runs/*/' matches (labelled by folder name), to compare checkpoints in one run."""
    if not glob.has_magic(heads):
        return {"heads": heads}
    found = sorted(Path(p) for p in glob.glob(heads) if (Path(p) / CONFIG_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"no head bundle (a folder with {CONFIG_FILE}) matches {heads!r}")
    labels = [p.name for p in found]
    if len(set(labels)) < len(labels):  # same folder names under different parents: use the paths
        labels = [str(p) for p in found]
    return dict(zip(labels, map(str, found), strict=True))


def run(args: argparse.Namespace) -> int:
    if args.heads is None:
        raise ValueError("--heads is required: a bundle folder, 'default', or 'norm_lm[:4,8,12]'")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    t0 = time.perf_counter()
    model = load_model(args)
    bundles = {label: resolve_bundle(model, spec) for label, spec in bundle_specs(args.heads).items()}
    if args.compare_norm_lm:
        layers = sorted({layer for b in bundles.values() for layer in b.layers})
        if all(k == "norm_lm" for b in bundles.values() for k in b.config.head_kinds.values()):
            print("the bundles are norm_lm already; --compare-norm-lm adds nothing", file=sys.stderr)
        else:
            bundles["norm_lm"] = HeadBundle.create(model.lm, layers, "norm_lm", base_model=model.name)
    seqs = sequences_from_args(model, args, "eval")
    info = data_info(args, seqs, "eval")
    print(f"evaluating {len(bundles)} bundle(s) on {info['n_sequences']} held-out sequences, {info['n_tokens']} "
          f"scored tokens ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows = evaluate_bundles(model, bundles, seqs)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    meta = {"model": model.name, "heads": args.heads, "data": info, "seconds": time.perf_counter() - t0,
            "bundles": {label: b.describe() for label, b in bundles.items()}, "rows": rows}
    (out / "results.json").write_text(json.dumps(meta, indent=2))
    plot_layer_sweep(rows, out / "layer_sweep.png", title=f"{model.name}: exit heads ({args.heads}), "
                     f"{info['n_tokens']} held-out tokens")
    print(format_table(rows))
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'layer_sweep.png'} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0
