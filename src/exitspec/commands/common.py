"""Options shared by every command that loads a model."""

from __future__ import annotations

import argparse
import os

import torch

from exitspec.loading import attach_heads, load


def add_model_args(p: argparse.ArgumentParser, heads: bool = True, fast: bool = False) -> None:
    """`fast`: the command defaults to the fastest path (commands/fast_path.py): --weights auto and,
    with heads, --heads auto."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), 'gemma3-270m' (embedded Gemma 3 270M base "
                        "model, plain-text prompts), an HF folder, a .gguf file, or a hub id")
    g.add_argument("--dtype", default=None, help="float32 (default for dense weights), bfloat16 or float16")
    g.add_argument("--weights", default="auto" if fast else "dense",
                   choices=("auto", "dense", "int4") if fast else ("dense", "int4"),
                   help=("auto (default): int4 where the checkpoint's projections are stored in blocks "
                         "exitspec's kernels read and the kernels run, else dense; " if fast else "dense (default) or ")
                   + "int4: keep a GGUF's quantised weights (Q4_0 / Q4_1 groups, as the default model's; "
                     "K-quant Q4_K / Q5_0 / Q6_K / Q8_0 blocks on Gemma 3 and Llama-family models, as "
                     "gemma3-270m's) and run them with exitspec's CPU kernels (AVX-512 BF16 or AVX2; inputs of "
                     "the products rounded to bf16 / int8, fp32 elsewhere); several times faster decode steps "
                     "than dense fp32 on CPU")
    g.add_argument("--kv-cache", default=None, choices=("float32", "float16"),
                   help="KV cache element type (default: the model's dtype); float16 needs --weights int4 on a "
                        "Llama-family model: half the cache memory, faster steps over long contexts")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    if heads:
        g.add_argument("--heads", default="auto" if fast else None,
                       help="exit-head bundle folder; 'default' = the bundle shipped for the loaded model (both "
                            "embedded models have one)"
                            + ("; auto (default): that bundle where one is shipped for the model, none otherwise; "
                               "none = no heads" if fast else ""))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def set_threads(n: int | None) -> None:
    torch.set_num_threads(n or os.cpu_count() or 1)


def load_model(args: argparse.Namespace):
    """Set the thread count and load the model named by the model options (no heads)."""
    set_threads(getattr(args, "threads", None))
    return load(args.model, dtype=args.dtype, device=args.device, weights=args.weights,
                kv_cache=getattr(args, "kv_cache", None))


def load_from_args(args: argparse.Namespace):
    """Load the model (and heads, when asked) named by the model options."""
    model = load_model(args)
    heads = getattr(args, "heads", None)
    if heads:
        attach_heads(model, heads)
    return model


def add_bundle_answers_args(p: argparse.ArgumentParser, limit: int, limit_help: str) -> None:
    """The options of a command that answers train-split prompts to add to a bundle (datastore,
    train-lookahead): where the bundle goes, which prompts, how many."""
    p.add_argument("--out", required=True, help="bundle folder to write (may be the --heads folder itself)")
    p.add_argument("--data", default="mixed",
                   help="'mixed' (train splits of ../shared/data) or a prompt file (its train split)")
    p.add_argument("--per-set", type=int, default=2000, help="with --data mixed: prompts per shared set")
    p.add_argument("--limit", type=int, default=limit, help=limit_help)
