"""`exitspec train-lookahead`: add a lookahead draft head (heads/lookahead.py) to a head bundle.

    exitspec train-lookahead --weights int4 --heads default --answers corpus --out my-bundle

The head learns from the model's own greedy answers to train-split prompts run through the frozen
model (training/lookahead.py). `--answers corpus` takes those answers from the bundle's draft
datastore (the answers `exitspec datastore` wrote, to the same prompts in the same order; each
answer keeps the last prompt tokens, which are checked against the prompt it is paired with), so no
generation is spent; `--answers generate` answers the prompts anew (cached in --work, as `exitspec
datastore` does). The bundle is copied with the head added; its exit heads, thresholds and
datastore are unchanged, and the folder is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exitspec.commands.common import add_bundle_answers_args, add_model_args, load_from_args
from exitspec.decoding.api import encode_prompt
from exitspec.decoding.draft_vocab import draft_vocabulary
from exitspec.runtime.sequences import TokenSequence
from exitspec.training.data import HEADER_TOKENS, DistillSettings, read_source, self_distill
from exitspec.training.lookahead import LookaheadTrainConfig, collect_features, train_lookahead


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, heads=True)
    add_bundle_answers_args(p, 2000, "at most this many answers (0 = all)")
    p.add_argument("--answers", choices=("corpus", "generate"), default="corpus",
                   help="corpus: the bundle's datastore answers (no generation); generate: answer the prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --answers generate")
    p.add_argument("--work", help="with --answers generate: folder for the cached answers")
    defaults = LookaheadTrainConfig()
    p.add_argument("--width", type=int, default=defaults.width, help="the head's SwiGLU width")
    p.add_argument("--draft-vocab", type=int, default=defaults.draft_vocab,
                   help="draft over the N most frequent tokens")
    p.add_argument("--epochs", type=float, default=defaults.epochs)
    p.add_argument("--unroll", type=int, default=defaults.unroll, help="drafting steps trained per window")
    p.add_argument("--no-progress", action="store_true")


def corpus_answers(model, prompts, limit: int) -> list[TokenSequence]:
    """The bundle's datastore answers as prompt + answer sequences (module docstring)."""
    corpus = model.heads.draft_sequences() if model.heads is not None else None
    if not corpus:
        raise ValueError("--answers corpus needs a bundle with a draft datastore (--heads default, or one written "
                         "by `exitspec datastore`); or pass --answers generate")
    if len(corpus) != len(prompts):
        raise ValueError(f"the bundle's datastore holds {len(corpus)} answers but --data gives {len(prompts)} "
                         "prompts: pass the --data / --per-set it was built from, or --answers generate")
    out = []
    for prompt, answer in zip(prompts, corpus, strict=True):
        ids = encode_prompt(model.tokenizer, prompt.text)
        if ids[-HEADER_TOKENS:] == answer[:HEADER_TOKENS] and len(answer) > HEADER_TOKENS:
            out.append(TokenSequence(ids + answer[HEADER_TOKENS:], len(ids)))
    if len(out) < 0.9 * len(corpus):
        raise ValueError(f"only {len(out)} of the datastore's {len(corpus)} answers follow their prompt's last tokens: "
                         "it was not built from --data's prompts in this order; pass --answers generate")
    return out[: limit or None]


def run(args: argparse.Namespace) -> int:
    if not args.heads:
        raise ValueError("--heads is needed: the bundle the lookahead head joins ('default' for the shipped one)")
    if args.per_set <= 0 or args.limit < 0 or args.max_new_tokens <= 0:
        raise ValueError("--per-set and --max-new-tokens must be >= 1, --limit >= 0")
    cfg = LookaheadTrainConfig(width=args.width, draft_vocab=args.draft_vocab, epochs=args.epochs, unroll=args.unroll)
    model = load_from_args(args)
    prompts, texts = read_source(args.data, per_set=args.per_set)
    if texts or not prompts:
        raise ValueError(f"{args.data!r} holds no prompts to answer (plain text is not a prompt set)")
    if args.answers == "corpus":
        examples = corpus_answers(model, prompts, args.limit)
    else:
        out_name = Path(args.out).name
        work = Path(args.work) if args.work else Path("runs") / f"datastore-{out_name}"
        examples = self_distill(model, prompts[: args.limit or None], work / f"answers-{model.weights}.jsonl",
                                DistillSettings(max_new_tokens=args.max_new_tokens), progress=not args.no_progress)

    def progress(i: int, n: int) -> None:
        if not args.no_progress and (i % 100 == 0 or i == n):
            print(f"\rfeatures {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)

    data = collect_features(model.lm, examples, progress)
    vocab = draft_vocabulary(model, cfg.draft_vocab, model.heads)
    head, report = train_lookahead(model.lm, data, vocab, cfg,
                                   log=(lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr)))
    report |= {"answers": args.answers, "data": args.data, "weights": model.weights, "positions": data.positions}
    bundle = model.heads
    bundle.set_lookahead(head, report)
    bundle.save_as_trained(args.out)
    print(f"wrote {args.out}: lookahead head ({head.param_count():,} parameters, draft vocabulary {len(vocab)}), "
          f"held-out top-1 by step {report.get('val_top1_by_step')}, "
          f"chain acceptance {report.get('val_chain_acceptance')}")
    return 0
