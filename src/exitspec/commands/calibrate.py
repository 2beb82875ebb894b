"""`exitspec calibrate`: choose per-exit confidence thresholds on held-out text, save a new bundle.

    exitspec calibrate --heads runs/heads --target 0.95 --out runs/heads-cal
    exitspec calibrate --heads norm_lm:8,12,16 --score max_prob --out runs/lens-cal
    exitspec calibrate --heads runs/heads-cal --reference-only --out runs/heads-cal

Besides the thresholds, each calibrated exit gets the prompt reference that run-time adaptation
(`adapt`) shifts thresholds from (calibration/prompt_reference.py), measured on the calibration
sequences' prompts at --adapt-window. --reference-only adds just that to an already calibrated
bundle: thresholds and estimators stay as they are, and no answers are generated (prompts suffice).

The input bundle is never modified unless --out names it: the calibrated bundle is written
atomically (HeadBundle.save), so an interrupted run leaves no half-written folder behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from exitspec.calibration.calibrate import SCORE_CHOICES, calibrate_bundle
from exitspec.calibration.collect import collect
from exitspec.calibration.estimator import EstimatorTrainConfig
from exitspec.calibration.prompt_reference import add_prompt_references
from exitspec.calibration.sequences import heldout_prompts
from exitspec.calibration.thresholds import check_target
from exitspec.commands.common import add_model_args, load_model
from exitspec.commands.heldout import add_data_args, data_info, resolve_bundle, sequences_from_args
from exitspec.decoding.adapt import DEFAULT_WINDOW, MIN_POSITIONS
from exitspec.decoding.api import encode_prompt
from exitspec.decoding.draft_vocab import draft_vocabulary
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
    p.add_argument("--adapt-window", type=int, default=DEFAULT_WINDOW,
                   help="prompt positions the stored prompt reference scores: the adapt_window to decode with "
                        "(cascade / mlp-skip adapt=...)")
    p.add_argument("--exit-vocab", type=int, default=0,
                   help="calibrate for cascade's exit_vocab=N: scores and agreement of each exit's N most frequent "
                        "tokens (the bundle's token_frequencies); the thresholds then serve only exit_vocab=N "
                        "(0 = the full vocabulary, default)")
    p.add_argument("--reference-only", action="store_true",
                   help="keep the bundle's thresholds and estimators, only (re)store its prompt references from "
                        "the held-out calibration prompts (no answers are generated)")
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
    if args.adapt_window < MIN_POSITIONS:
        raise ValueError(f"--adapt-window is how many prompt positions the prompt reference scores, at least "
                         f"{MIN_POSITIONS}, got {args.adapt_window}; e.g. --adapt-window {DEFAULT_WINDOW}")
    if args.heads is None:
        raise ValueError("--heads is required: a bundle folder, 'default', or 'norm_lm[:4,8,12]'")
    out = Path(args.out) if args.out else default_out(args.heads)
    check_out(out)
    t0 = time.perf_counter()
    model = load_model(args)
    bundle = resolve_bundle(model, args.heads)
    if args.reference_only:
        return run_reference_only(args, model, bundle, out)
    print(f"calibrating {len(bundle.layers)} exits {bundle.layers} of {model.name} for target agreement "
          f"{target:.1%} (score: {args.score})", file=sys.stderr)
    seqs = sequences_from_args(model, args, "calibrate")
    info = data_info(args, seqs, "calibrate")
    print(f"{info['n_sequences']} held-out sequences, {info['n_tokens']} scored tokens "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    keep = args.score in ("auto", "learned") and not args.exit_vocab
    vocab = exit_vocab_ids(model, bundle, args.exit_vocab, args.score)
    data = collect(model.lm, {"heads": bundle}, seqs, keep_features=keep, vocab=vocab).exits["heads"]
    train = EstimatorTrainConfig(proj_dim=args.estimator_proj_dim, mlp_dim=args.estimator_mlp_dim,
                                 inputs=args.estimator_inputs)
    entries = calibrate_bundle(bundle, data, target, args.score, train=train, data_info=info, progress=True,
                               exit_vocab=args.exit_vocab)
    prompts = [s.ids[:s.start] for s in seqs]
    try:
        add_prompt_references(model.lm, bundle, prompts, args.adapt_window)
    except ValueError as err:  # e.g. plain text (--text-file) has no prompts: the thresholds still hold
        print(f"warning: no prompt reference stored ({err}); `adapt` on this bundle falls back to the blend",
              file=sys.stderr)
    path = bundle.save_as_trained(out)
    keys = ("score", "value", "coverage", "agreement")
    summary = {str(layer): {k: e[k] for k in keys} for layer, e in entries.items()}
    print(json.dumps(summary, indent=1))
    print(f"saved calibrated bundle to {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


def exit_vocab_ids(model, bundle, n: int, score: str) -> torch.Tensor | None:
    """--exit-vocab N -> the (N,) token ids cascade's exit_vocab=N emits from, None for 0; refused where
    cascade would refuse it (decoding/strategies/cascade.py)."""
    if n == 0:
        return None
    if not 0 < n <= model.lm.vocab_size:
        raise ValueError(f"--exit-vocab must be between 0 and the vocabulary size {model.lm.vocab_size}, got {n}")
    if score == "learned":
        raise ValueError("--exit-vocab calibrates max_prob, entropy or margin (a learned estimator reads "
                         "full-vocabulary features); pass --score auto or one of those")
    if bundle.config.training.get("token_frequencies") is None:
        raise ValueError("--exit-vocab needs the bundle's token frequency list (bundle.json "
                         "training.token_frequencies); calibrate a bundle that has one")
    return draft_vocabulary(model, n, bundle)


def run_reference_only(args: argparse.Namespace, model, bundle, out: Path) -> int:
    """Only the prompt references, from the calibration prompts (or --sequences' prompts)."""
    if args.text_file:
        raise ValueError("--reference-only measures how hard prompts read; --text-file holds plain text, no "
                         "prompts: pass --prompts FILE, or nothing for the shared held-out sets")
    if args.sequences:
        prompts = [s.ids[:s.start] for s in sequences_from_args(model, args, "calibrate")]
    else:
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
        prompts = [encode_prompt(model.tokenizer, p.text, True)
                   for p in heldout_prompts("calibrate", args.num_prompts, args.prompts)]
    stored = add_prompt_references(model.lm, bundle, prompts, args.adapt_window)
    path = bundle.save_as_trained(out)
    print(json.dumps({str(layer): {"values": r["values"], "never": r["never"], "n_prompts": r["n_prompts"]}
                      for layer, r in stored.items()}, indent=1))
    print(f"saved the bundle with prompt references (window {args.adapt_window}) to {path}", file=sys.stderr)
    return 0
