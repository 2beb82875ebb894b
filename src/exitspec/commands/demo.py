"""`exitspec demo`: the main job. Side-by-side greedy decoding on an embedded model (`--model default`,
the chat model SmolLM2-135M-Instruct, or `--model gemma3-270m`, the base model Gemma 3 270M).

Runs HF `generate` and exitspec's vanilla loop, plus every faster strategy the exit heads shipped for
the model support, on a few built-in prompts (chat prompts through the chat template; plain text for a
base model without one, which continues text rather than answering); prints the first output, then
tokens/s, speedup against the fastest baseline of this same run, and whether each lossless strategy
reproduced vanilla exactly.
"""

from __future__ import annotations

import argparse
import statistics

from exitspec.bench.loop_speed import hf_generate_tps
from exitspec.bench.machine import machine_line
from exitspec.commands.common import add_model_args, load_from_args
from exitspec.decoding.api import encode_prompt, generate
from exitspec.heads.bundle import BundleError
from exitspec.loading import NoInt4WeightsError, attach_heads

DEMO_PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give me three tips for staying focused while studying.",
]
# The same three tasks as text for a base model to continue (no chat template: chat=False).
BASE_PROMPTS = [
    "The sky looks blue on a clear day because",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Three tips for staying focused while studying:\n1.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    # The demo runs the fastest sound setting: the GGUF's own 4-bit weights where the model has them.
    p.set_defaults(heads="auto", weights="int4")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--strategies", default=None,
                   help="comma-separated strategies (default: vanilla + those the heads support)")


def run(args: argparse.Namespace) -> int:
    auto = args.heads == "auto"
    if auto:
        args.heads = None
    try:
        model = load_from_args(args)
    except NoInt4WeightsError as err:
        print(f"(dense weights: {err})")
        args.weights = "dense"
        model = load_from_args(args)
    if auto:
        try:
            attach_heads(model, "default")
        except BundleError as err:
            print(f"(no exit heads: {err})")
    strategies = ["vanilla", "lookup"]  # lookup needs no heads: it drafts by copying from the context
    recommended = {}
    if model.heads is not None:
        recommended = model.heads.config.recommended
        strategies += [s for s in ("self-spec", "dssd", "cascade", "mlp-skip") if s in recommended]
    if args.strategies:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    n = args.max_new_tokens
    chat = bool(getattr(model.tokenizer, "chat_template", None))
    prompts = DEMO_PROMPTS if chat else BASE_PROMPTS
    enc = [encode_prompt(model.tokenizer, p, chat=chat) for p in prompts]
    print(f"exitspec demo on {model.name} ({model.lm.num_layers} layers, {model.weights} weights; HF generate "
          f"runs the dense fp32 model), greedy, {n} new tokens, {len(enc)} {'chat' if chat else 'plain-text'} "
          f"prompts\nmachine: {machine_line()}\n")
    hf_generate_tps(model, enc[0], 4)  # warm-up
    tps: dict[str, list[float]] = {"HF generate": [hf_generate_tps(model, ids, n) for ids in enc]}
    outputs: dict[str, list[list[int]]] = {}
    for s in strategies:
        opts = recommended.get(s, {})
        # Warm-up, as for HF generate: the first call builds the draft head and packs its weights.
        generate(model, None, prompt_ids=[enc[0]], strategy=s, max_new_tokens=4, **opts)
        runs = [generate(model, None, prompt_ids=[ids], strategy=s, max_new_tokens=n, **opts)
                for ids in enc]
        outputs[s] = [r.token_ids[0] for r in runs]
        tps[s] = [r.stats.tokens_per_s for r in runs]
        if s == "vanilla":
            print(f"Q: {prompts[0]}\nA: {runs[0].text}\n" if chat else
                  f"Prompt: {prompts[0]!r}\nContinuation: {runs[0].text}\n")
    base = max(statistics.median(tps["HF generate"]), statistics.median(tps.get("vanilla", [0])))
    print(f"{'decoder':<14} {'tokens/s':>9} {'speedup':>8}  output vs vanilla")
    for name, vals in tps.items():
        med = statistics.median(vals)
        same = ""
        if name in outputs and name != "vanilla" and "vanilla" in outputs:
            agree = sum(a == b for a, b in zip(outputs[name], outputs["vanilla"], strict=True))
            same = f"{agree}/{len(enc)} identical"
        print(f"{name:<14} {med:9.1f} {med / base:7.2f}x  {same}")
    print("\nspeedup = median tokens/s over the faster of HF generate and the vanilla loop in this run")
    return 0
