"""Command-line pieces shared by `exitspec calibrate` and `exitspec eval-heads`: which heads, which text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exitspec.calibration.sequences import (
    greedy_sequences,
    heldout_prompts,
    load_sequences,
    reference_sequences,
    save_sequences,
    text_sequences,
)
from exitspec.heads.bundle import HeadBundle
from exitspec.loading import attach_heads
from exitspec.runtime.sequences import TokenSequence


def add_data_args(p: argparse.ArgumentParser, num_prompts: int, max_new_tokens: int) -> None:
    g = p.add_argument_group("held-out data")
    g.add_argument("--prompts", default=None,
                   help="prompt file (its held-out last 20%%); default: the shared public prompt sets")
    g.add_argument("--num-prompts", type=int, default=num_prompts)
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="length of the greedy continuation scored per prompt")
    g.add_argument("--text", choices=("greedy", "reference"), default="greedy",
                   help="score the base model's greedy answers (default) or the data set's reference answers")
    g.add_argument("--text-file", default=None, metavar="FILE",
                   help="score plain text instead (out-of-domain: a .txt file's paragraphs or JSONL records' text), "
                        "--num-prompts windows of up to --max-new-tokens tokens")
    g.add_argument("--save-sequences", default=None, metavar="FILE",
                   help="write the scored token sequences as JSON (greedy decoding is the slow part)")
    g.add_argument("--sequences", default=None, metavar="FILE",
                   help="reuse sequences written by --save-sequences instead of building them")


def sequences_from_args(model, args: argparse.Namespace, part: str) -> list[TokenSequence]:
    if args.sequences:
        seqs, made_for = load_sequences(args.sequences, model.lm.vocab_size)
        if made_for != part:
            print(f"warning: {args.sequences} was built for {made_for!r}, not {part!r}: calibration and "
                  "evaluation on the same text overstate coverage", file=sys.stderr)
    else:
        seqs = build_sequences(model, args, part)
    if args.save_sequences:
        save_sequences(seqs, args.save_sequences, part)
    return seqs


def build_sequences(model, args: argparse.Namespace, part: str) -> list[TokenSequence]:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.text_file:
        return text_sequences(model.tokenizer, args.text_file, args.max_new_tokens, args.num_prompts)
    prompts = heldout_prompts(part, args.num_prompts, args.prompts)
    if args.text == "reference":
        return reference_sequences(model, prompts, max_answer_tokens=args.max_new_tokens)
    seqs = greedy_sequences(model, prompts, max_new_tokens=args.max_new_tokens)
    if not seqs:
        raise ValueError("the model produced no tokens for any prompt; check the prompts")
    return seqs


def data_info(args: argparse.Namespace, seqs: list[TokenSequence], part: str) -> dict:
    source = args.sequences or args.text_file or args.prompts or "shared held-out sets"
    return {"part": part, "prompts": str(source), "text": "plain" if args.text_file else args.text,
            "n_sequences": len(seqs), "max_new_tokens": args.max_new_tokens,
            "n_tokens": sum(s.n_scored for s in seqs)}


def resolve_bundle(model, spec: str):
    """--heads value -> HeadBundle: a folder, 'default' (shipped), or 'norm_lm[:L1,L2,..]'.

    'norm_lm' builds the parameter-free logit-lens bundle in memory (every 4th layer by default):
    the baseline every trained head must beat, and a way to try the tools before training.
    """
    if spec is None:
        raise ValueError("--heads is required: a bundle folder, 'default', or 'norm_lm[:4,8,12]'")
    if spec == "norm_lm" or spec.startswith("norm_lm:"):
        return HeadBundle.create(model.lm, norm_lm_layers(model.lm.num_layers, spec.partition(":")[2]),
                                 "norm_lm", base_model=model.name)
    if spec != "default" and not Path(spec).exists():
        raise FileNotFoundError(f"head bundle {spec} does not exist; pass a bundle folder, 'default', or "
                                "'norm_lm[:4,8,12]' for the logit-lens baseline")
    return attach_heads(model, spec)


def norm_lm_layers(num_layers: int, text: str = "") -> list[int]:
    if not text:
        return list(range(4, num_layers, 4)) or [num_layers // 2 or 1]
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"norm_lm layers must be comma-separated integers, got {text!r}") from None
    bad = [layer for layer in layers if not 0 < layer < num_layers]
    if bad or not layers:
        raise ValueError(f"norm_lm exit layers must lie in 1..{num_layers - 1}, got {text!r}")
    return layers
