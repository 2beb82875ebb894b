"""The fastest path by default, for `serve`, `generate` and `bench-runtime`: what `auto` resolves to.

    --weights auto   int4 where the checkpoint is a GGUF whose projections are stored in blocks exitspec's
                     CPU kernels read (Q4_0 / Q4_1 groups, as the default model's; on Gemma 3 and Llama-family
                     models also the K-quant blocks Q4_K / Q5_0 / Q6_K / Q8_0, as gemma3-270m's) and the
                     kernels run on this machine; dense otherwise, with the reason
    --heads auto     the bundle shipped for the loaded model where there is one (default, gemma3-270m);
                     none otherwise
    --strategy auto  lookup (lossless: token for token what vanilla gives on the same weights; drafts
                     from the context and the attached bundle's datastore) when heads are attached,
                     else vanilla

`--weights dense`, `--heads none` and `--strategy vanilla` opt out one by one. `describe()` is the
startup line that says what runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exitspec import kernels
from exitspec.commands.common import set_threads
from exitspec.heads.bundle import BundleError
from exitspec.loading import EMBEDDED_MODELS, NoInt4WeightsError, attach_heads, load, resolve_device

# The lossless strategy `auto` picks with heads attached (fastest lossless on the default model:
# README "Results"); its options come from the bundle's recommendation when it names any.
AUTO_STRATEGY = "lookup"


def may_hold_blocks(args: argparse.Namespace) -> str | None:
    """None when an int4 load is worth trying (the load itself then checks the block types), else why
    dense runs."""
    if resolve_device(args.device).type != "cpu":
        return "int4 runs on the CPU only"
    if args.dtype not in (None, "float32"):
        return f"--dtype {args.dtype} asked for"
    if str(args.model) not in EMBEDDED_MODELS and Path(str(args.model)).suffix != ".gguf":
        return "the checkpoint is not a GGUF file, so it holds no quantised blocks"
    why = kernels.unavailable_reason()
    return f"exitspec's kernels do not run here ({why})" if why else None


def load_fastest(args: argparse.Namespace) -> tuple[object, list[str]]:
    """Load the model the way `args` says, resolving `auto` weights and heads; returns it and notes
    saying why anything fell back."""
    set_threads(getattr(args, "threads", None))
    kv = getattr(args, "kv_cache", None)
    notes: list[str] = []
    model = None
    if args.weights == "auto":
        why = may_hold_blocks(args)
        if why is None:
            try:
                model = load(args.model, dtype=args.dtype, device=args.device, weights="int4", kv_cache=kv)
            except NoInt4WeightsError as err:
                why = str(err)
        if why is not None:
            notes.append(f"dense weights: {why}")
    if model is None:
        model = load(args.model, dtype=args.dtype, device=args.device,
                     weights="dense" if args.weights == "auto" else args.weights, kv_cache=kv)
    heads = getattr(args, "heads", None)
    if heads == "auto":
        try:
            attach_heads(model, "auto")  # the shipped bundle made for this model, if any
        except BundleError as err:  # one is shipped for its architecture, but not for these weights
            notes.append(f"no heads: {err}")
    elif heads and heads != "none":
        attach_heads(model, heads)
    return model, notes


def resolve_strategy(name: str, model) -> str:
    """`auto` -> the lossless strategy that runs fastest with what is loaded."""
    if name != "auto":
        return name
    return AUTO_STRATEGY if model.heads is not None else "vanilla"


def describe(model, strategy: str | None = None, notes: list[str] = ()) -> str:
    """One line: weights and kernels, KV cache, heads, strategy, and why anything fell back."""
    lm = model.lm
    heads = f"exit heads at layers {model.heads.layers}" if model.heads is not None else "no exit heads"
    parts = [f"weights {lm.weights} ({lm.backend})", f"KV cache {str(lm.kv_dtype).removeprefix('torch.')}", heads]
    if strategy is not None:
        parts.append(f"strategy {strategy}")
    return "; ".join(parts) + (f" [{'; '.join(notes)}]" if notes else "")
