"""`exitspec datastore`: rebuild a head bundle's draft datastore from more of the model's own answers.

    exitspec datastore --weights int4 --heads default --per-set 2000 --out my-bundle

`lookup` drafts the continuation the model itself most often wrote after the last few tokens
(decoding/datastore.py). More answers give more and better matches: on the default model, lookup's
estimated speedup grew with the share of the earlier bundle's 1,770 answers kept, and the shipped
bundle's datastore was rebuilt with this command from 5,869 prompts (`--weights int4 --per-set
2000`), which raised tokens per verification and lookup's speedup over the int4 vanilla loop
(benchmarks/README.md, 'Design measurements'). This command answers train-split prompts
(the shared sets by default, or a prompt file) with exitspec's batched greedy decoding, caches the
answers in --work (an interrupted run continues), and writes a copy of the bundle whose datastore is
those answers; head weights, thresholds and settings are copied unchanged, and the bundle folder is
written atomically (a failed run never leaves a half-written one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exitspec.commands.common import add_bundle_answers_args, add_model_args, load_from_args
from exitspec.training.data import DistillSettings, draft_corpus, read_source, self_distill


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, heads=True)
    add_bundle_answers_args(p, 0, "at most this many prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="prompts decoded together")
    p.add_argument("--work", help="folder for the cached answers (default runs/datastore-<out name>)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if not args.heads:
        raise ValueError("--heads is needed: the bundle whose heads the new datastore goes with "
                         "('default' for the shipped one)")
    if args.per_set <= 0 or args.max_new_tokens <= 0 or args.batch <= 0 or args.limit < 0:
        raise ValueError("--per-set, --max-new-tokens and --batch must be >= 1, --limit >= 0")
    model = load_from_args(args)
    prompts, texts = read_source(args.data, per_set=args.per_set, limit=args.limit)
    prompts = prompts[: args.limit or None]
    if texts or not prompts:
        raise ValueError(f"{args.data!r} holds no prompts to answer (plain text is not a prompt set)")
    out = Path(args.out)
    work = Path(args.work) if args.work else Path("runs") / f"datastore-{out.name}"
    settings = DistillSettings(max_new_tokens=args.max_new_tokens, batch=args.batch)
    # One cache per weights mode: int4 answers are the int4 model's own, not the dense model's.
    examples = self_distill(model, prompts, work / f"answers-{model.weights}.jsonl", settings,
                            progress=not args.no_progress)
    corpus = draft_corpus(examples)
    bundle = model.heads
    bundle.set_draft_corpus(corpus, source=f"greedy answers ({model.weights} weights, {args.max_new_tokens} "
                                           f"tokens) to {len(corpus)} train prompts of {args.data}")
    # Heads are shipped in fp16 and come back exactly from an fp16 copy; a bundle trained in fp32 stays fp32.
    bundle.save_as_trained(out)
    n_tok = sum(len(c) for c in corpus)
    print(f"wrote {out}: draft datastore of {len(corpus)} answers ({n_tok} tokens), heads at layers {bundle.layers}")
    return 0
