"""`exitspec calibrate`: choose per-exit confidence thresholds on held-out text, save a new bundle.

    exitspec calibrate --heads runs/heads --target 0.95 --out runs/heads-cal
    exitspec calibrate --heads norm_lm:8,12,16 --score max_prob --out runs/lens-cal

The input bundle is never modified unless --out names it: the calibrated bundle is written
atomically (HeadBundle.save), so an interrupted run leaves no half-written folder behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from exitspec.calibration.calibrate import SCORE_CHOICES, calibrate_bundle
from exitspec.calibration.collect import collect
from exitspec.calibration.estimator import EstimatorTrainConfig
from exitspec.calibration.thresholds import check_target
from exitspec.commands.common import add_model_args, load_model
from exitspec.commands.heldout import add_data_args, data_info, resolve_bundle, sequences_from_args
from exitspec.heads.bundle import CONFIG_FILE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=float, default=0.95,
                   help="agreement with the full model's top-1 required among accepted tokens (0 < t <= 1)")
    p.add_argument("--score", choices=SCORE_CHOICES, default="auto",
                   help="confidence score; auto = the one with the most coverage per exit (default)")
    p.add_argument("--out", default=None,
                   help="folder for the calibrated bundle (default: <heads>-calibrated beside the input)")
    p.add_argument("--estimator-proj-dim", type=int, default=8, help="learned estimator: hidden projection rank")
    p.add_argument("--estimator-mlp-dim", type=int, default=16, help="learned estimator: MLP width (0 = logistic)")
    p.add_argument("--estimator-inputs", choices=("scores+hidden", "hidden"), default="scores+hidden",
                   help="learned estimator: read the exit's scores and hidden state, or only the hidden state "
                        "(decides before the exit's LM head: cheaper gates for cascade, mlp-skip, dssd)")
    add_model_args(p)
    add_data_args(p, num_prompts=40, max_new_tokens=96)


def default_out(heads: str) -> Path:
    if heads == "default" or heads.startswith("norm_lm"):
        return Path(f"heads-{heads.replace(':', '-').replace(',', '_')}-calibrated")
    return Path(heads.rstrip("/") + "-calibrated")


def check_out(out: Path) -> None:
    """Refuse to replace something that is not a head bundle (e.g. a typo pointing at a source folder)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
        raise ValueError(f"--out {out} exists and is not a head bundle; choose a new folder")


def run(args: argparse.Namespace) -> int:
    target = check_target(args.target)
    if args.heads is None:
        raise ValueError("--heads is required: a bundle folder, 'default', or 'norm_lm[:4,8,12]'")
    out = Path(args.out) if args.out else default_out(args.heads)
    check_out(out)
    t0 = time.perf_counter()
    model = load_model(args)
    bundle = resolve_bundle(model, args.heads)
    print(f"calibrating {len(bundle.layers)} exits {bundle.layers} of {model.name} for target agreement "
          f"{target:.1%} (score: {args.score})", file=sys.stderr)
    seqs = sequences_from_args(model, args, "calibrate")
    info = data_info(args, seqs, "calibrate")
    print(f"{info['n_sequences']} held-out sequences, {info['n_tokens']} scored tokens "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    keep = args.score in ("auto", "learned")
    data = collect(model.lm, {"heads": bundle}, seqs, keep_features=keep).exits["heads"]
    train = EstimatorTrainConfig(proj_dim=args.estimator_proj_dim, mlp_dim=args.estimator_mlp_dim,
                                 inputs=args.estimator_inputs)
    entries = calibrate_bundle(bundle, data, target, args.score, train=train, data_info=info, progress=True)
    path = bundle.save(out)
    keys = ("score", "value", "coverage", "agreement")
    summary = {str(layer): {k: e[k] for k in keys} for layer, e in entries.items()}
    print(json.dumps(summary, indent=1))
    print(f"saved calibrated bundle to {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0
