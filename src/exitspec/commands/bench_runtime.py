"""`exitspec bench-runtime`: the foundation's speed check, in one run on one model.

Reports tokens/s of HF `generate` (greedy) and of exitspec's vanilla loop over the same prompts
(medians, exactly `max_new_tokens` each, EOS ignored so every run does the same work), and the cost
of one forward step over k = 1, 2, 4, 8 new tokens with a warm cache. With `--weights int4`, also the
4-bit loop's speed and its fidelity to the dense model (greedy divergence, teacher-forced top-1
agreement, KL and perplexity); adding `--kv-cache float16` runs the 4-bit loop a second time over an
fp16 KV cache, with the same figures, and times a step of both at 256 / 1024 / 2048 cached tokens.
`--weights auto` (the default) is int4 where the checkpoint's projections are stored in blocks the
kernels read (Q4_0 / Q4_1 groups, or K-quant blocks on Gemma 3 and Llama-family models) and the
kernels run (commands/fast_path.py), else dense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exitspec.bench.loop_speed import measure, report
from exitspec.commands.common import add_model_args, load_from_args
from exitspec.commands.fast_path import may_hold_blocks
from exitspec.decoding.api import encode_prompt
from exitspec.loading import load
from exitspec.prompts import load_prompts, mixed_prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, heads=False, fast=True)
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", default=None, help="prompt file (default: held-out shared prompts)")
    p.add_argument("--out", default=None, help="folder for runtime.json and runtime.md")


def run(args: argparse.Namespace) -> int:
    # HF generate and the reference loop always run the dense model (fp32 unless --dtype says
    # otherwise); --weights int4 adds exitspec's vanilla loop over the 4-bit weights.
    # With --weights int4, --kv-cache float16 adds a second int4 runtime over an fp16 cache (the dense
    # model keeps its own; asked for with dense weights, the load says why it cannot).
    if args.weights == "auto":
        why = may_hold_blocks(args)
        args.weights = "int4" if why is None else "dense"
        print(f"[exitspec] --weights auto: {args.weights}" + (f" ({why})" if why else ""), file=sys.stderr)
    dense_args = argparse.Namespace(**{**vars(args), "weights": "dense",
                                       "kv_cache": None if args.weights == "int4" else args.kv_cache})
    model = load_from_args(dense_args)
    fast = {}  # result key prefix -> (loaded int4 model, its name in the tables)
    if args.weights == "int4":
        fast["int4"] = (load(args.model, device=args.device, weights="int4"), "int4 weights")
        if args.kv_cache == "float16":
            fast["int4_kv16"] = (load(args.model, device=args.device, weights="int4", kv_cache="float16"),
                                 "int4 weights, fp16 KV cache")
    if args.prompts:
        prompts = load_prompts(args.prompts, split="heldout", limit=args.num_prompts)
    else:
        prompts = mixed_prompts("heldout", per_set=(args.num_prompts + 4) // 5)[: args.num_prompts]
    enc = [encode_prompt(model.tokenizer, p.text) for p in prompts]
    n = args.max_new_tokens
    result = measure(model, fast, enc, n)
    report_md = report(result, fast, n)
    print("\n" + report_md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "runtime.json").write_text(json.dumps(result, indent=2))
        (out / "runtime.md").write_text(report_md)
    return 0
