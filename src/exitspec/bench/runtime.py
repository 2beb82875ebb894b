"""`exitspec bench-runtime`: the foundation's speed check, in one run on one model.

Reports tokens/s of HF `generate` (greedy) and of exitspec's vanilla loop over the same prompts
(medians, exactly `max_new_tokens` each, EOS ignored so every run does the same work), and the cost
of one forward step over k = 1, 2, 4, 8 new tokens with a warm cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from exitspec.commands.common import add_model_args, load_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, heads=False)
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", default=None, help="prompt file (default: held-out shared prompts)")
    p.add_argument("--out", default=None, help="folder for runtime.json and runtime.md")


def hf_generate_tps(model, ids: list[int], n: int) -> float:
    x = torch.tensor([ids], device=model.lm.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    dt = time.perf_counter() - t
    return (out.shape[1] - len(ids)) / dt


def vanilla_tps(model, ids: list[int], n: int) -> float:
    from exitspec.decoding.api import generate

    r = generate(model, None, prompt_ids=[ids], max_new_tokens=n, ignore_eos=True)
    return r.stats.new_tokens / r.stats.total_s


def run(args: argparse.Namespace) -> int:
    from exitspec.bench.machine import describe_machine, machine_line
    from exitspec.decoding.api import encode_prompt
    from exitspec.prompts import load_prompts, mixed_prompts
    from exitspec.runtime.profile import step_costs

    model = load_from_args(args)
    if args.prompts:
        prompts = load_prompts(args.prompts, split="heldout", limit=args.num_prompts)
    else:
        prompts = mixed_prompts("heldout", per_set=(args.num_prompts + 4) // 5)[: args.num_prompts]
    enc = [encode_prompt(model.tokenizer, p.text) for p in prompts]
    n = args.max_new_tokens
    hf_generate_tps(model, enc[0], 8)  # warm-up both paths
    vanilla_tps(model, enc[0], 8)
    hf, ours = [], []
    for i, ids in enumerate(enc):
        # Alternate the order so neither path always runs on a warmer cache.
        pair = [("hf", hf_generate_tps), ("vanilla", vanilla_tps)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            (hf if name == "hf" else ours).append(fn(model, ids, n))
        print(f"prompt {i + 1}/{len(enc)}: HF generate {hf[-1]:.1f} tok/s, vanilla loop {ours[-1]:.1f} tok/s",
              flush=True)
    costs = step_costs(model.lm)
    result = {
        "model": model.name, "machine": describe_machine(), "prompts": len(enc), "max_new_tokens": n,
        "hf_generate_tps_median": statistics.median(hf), "vanilla_tps_median": statistics.median(ours),
        "speedup_vs_hf": statistics.median(ours) / statistics.median(hf),
        "hf_generate_tps": hf, "vanilla_tps": ours, "step_costs": costs,
    }
    lines = [
        f"# Runtime benchmark: {model.name}", "",
        f"Machine: {machine_line(result['machine'])}", "",
        f"Greedy, {n} new tokens, {len(enc)} held-out prompts, medians:", "",
        "| decoder | tokens/s | vs HF generate |", "|---|---:|---:|",
        f"| HF generate | {result['hf_generate_tps_median']:.1f} | 1.00x |",
        f"| exitspec vanilla loop | {result['vanilla_tps_median']:.1f} | {result['speedup_vs_hf']:.2f}x |",
        "", "One forward step after 256 cached tokens (median ms):", "",
        "| k new tokens | step | layers | norm + LM head | vs k=1 |", "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['k']} | {r['step_ms']:.2f} | {r['layers_ms']:.2f} | {r['head_ms']:.2f} | {r['vs_k1']:.2f}x |"
              for r in costs]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "runtime.json").write_text(json.dumps(result, indent=2))
        (out / "runtime.md").write_text(report)
    return 0
