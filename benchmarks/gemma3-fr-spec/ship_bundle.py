"""The last step of making Gemma 3 270M's shipped head bundle: a calibrated bundle (`exitspec train`, then
`exitspec calibrate`) gets its recommended self-spec setting, the token ranking its reduced draft
vocabulary is cut from, and notes saying where both came from, and is saved with fp16 weights into the
package (calibration re-saves the weights as fp32, twice the size).

    PYTHONPATH=src python benchmarks/gemma3-fr-spec/ship_bundle.py --bundle runs/gemma3-270m-heads/calibrated \
        --out src/exitspec/assets/heads/gemma3-270m --exit-layer 15 --draft-len 3 --draft-vocab 8192 \
        --calibration-note "..." --recommended-note "..."

The recommendation is chosen from benchmarks/gemma3-fr-spec's counts (acceptance, and the weight bytes a
cycle reads), not from timings: see the README beside this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import exitspec  # noqa: E402  (after the path: runs from a checkout)
from exitspec.decoding.draft_vocab import corpus_token_ranking  # noqa: E402
from exitspec.heads.bundle import HeadBundle  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="the calibrated bundle folder")
    ap.add_argument("--out", type=Path, required=True, help="where to write the shipped bundle")
    ap.add_argument("--exit-layer", type=int, required=True)
    ap.add_argument("--draft-len", type=int, required=True)
    ap.add_argument("--draft-vocab", type=int, required=True)
    ap.add_argument("--ranked", type=int, default=0,
                    help="how many of the most frequent token ids the bundle keeps (0 = every id the shared sets "
                         "hold: 14k of Gemma's 262k; a larger draft_vocab is filled up with the lowest ids)")
    ap.add_argument("--calibration-note", required=True, help="the calibrate command that set the thresholds")
    ap.add_argument("--recommended-note", required=True, help="why this self-spec setting")
    args = ap.parse_args()

    model = exitspec.load("gemma3-270m")  # dense: the fingerprint check needs only the weights
    bundle = HeadBundle.load(args.bundle, model.lm)
    if args.exit_layer not in bundle.layers:
        raise SystemExit(f"--exit-layer {args.exit_layer} is not one of the bundle's exits {bundle.layers}")
    if not bundle.config.thresholds:
        raise SystemExit(f"{args.bundle} is not calibrated: run `exitspec calibrate` on it first")
    ranking = corpus_token_ranking(model.tokenizer)  # the train split of the shared sets, as draft_vocab ranks
    ranked = min(args.ranked or len(ranking), len(ranking))
    if args.draft_vocab > ranked:
        raise SystemExit(f"--draft-vocab {args.draft_vocab} is more than the {ranked} ranked ids it would be cut from")
    bundle.config.recommended = {"self-spec": {"exit_layer": args.exit_layer, "draft_len": args.draft_len,
                                               "draft_vocab": args.draft_vocab}}
    t = bundle.config.training
    t["token_frequencies"] = ranking[:ranked]
    t["token_frequencies_note"] = ("token ids by frequency in the train split of the shared prompt sets (prompts + "
                                   f"references, Gemma 3's tokenizer), top {ranked}: the draft_vocab=N subset, "
                                   "kept in the bundle so it needs no data")
    t["calibration_note"] = args.calibration_note
    t["recommended_note"] = args.recommended_note
    t["shipped_by"] = "benchmarks/gemma3-fr-spec/ship_bundle.py " + " ".join(
        f"{k}={v!r}" for k, v in (("exit_layer", args.exit_layer), ("draft_len", args.draft_len),
                                  ("draft_vocab", args.draft_vocab), ("ranked", ranked)))
    path = bundle.save(args.out, dtype=torch.float16)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"saved {path}: {size / 1e6:.2f} MB, exits {bundle.layers}, recommended {bundle.config.recommended}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
