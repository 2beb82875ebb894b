"""`exitspec generate`: stream a completion to the terminal, then print speed and strategy stats.

With no flags it runs the fastest path (commands/fast_path.py: int4 weights where they run, the heads
shipped for the loaded model, lookup); the first stderr line says what runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from exitspec.commands.common import add_model_args, add_sampling_args, sampling_kwargs
from exitspec.commands.fast_path import describe, load_fastest, resolve_strategy
from exitspec.decoding.api import stream
from exitspec.decoding.events import DoneEvent, TokenEvent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (sent as one user chat message unless --raw)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--strategy", default="auto",
                   help="vanilla, self-spec, dssd, cascade, mlp-skip, hybrid (these five use --heads) or lookup; auto "
                        "(default): lookup with heads attached, else vanilla (both lossless)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, e.g. --option exit_layer=12 --option draft_len=4 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the final stats as JSON")
    add_model_args(p, fast=True)
    add_sampling_args(p)


def parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def run(args: argparse.Namespace) -> int:
    model, notes = load_fastest(args)
    strategy = resolve_strategy(args.strategy, model)
    print(f"[exitspec] {describe(model, strategy, notes)}", file=sys.stderr, flush=True)
    prompt = args.prompt
    if args.system and not args.raw:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    done = None
    for ev in stream(model, prompt, strategy=strategy, chat=not args.raw,
                              **sampling_kwargs(args), **parse_options(args.option)):
        if isinstance(ev, TokenEvent) and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif isinstance(ev, DoneEvent):
            done = ev
    sys.stdout.write("\n")
    s = done.stats
    if args.json:
        print(json.dumps(s.summary(), indent=2))
    else:
        extra = ""
        if s.drafted:
            extra = f", {s.mean_accepted:.2f} drafts accepted per step ({s.acceptance_rate:.0%})"
        print(f"[{s.strategy}] {s.new_tokens} tokens in {s.total_s:.2f} s = {s.tokens_per_s:.1f} tokens/s "
              f"(first token {s.time_to_first_token_s * 1000:.0f} ms, {s.layers_per_token:.1f} layers/token"
              f"{extra}; finish: {done.finish_reasons[0]})", file=sys.stderr)
    return 0
