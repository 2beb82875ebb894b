"""`exitspec info`: the model's layout, parameters, and where a decode step's time goes."""

from __future__ import annotations

import argparse
import json

from exitspec.commands.common import add_model_args, load_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, heads=True)
    p.add_argument("--no-profile", action="store_true", help="skip timing the decode step")
    p.add_argument("--context", type=int, default=256, help="cached tokens before the timed step")
    p.add_argument("--json", action="store_true")


def describe(model) -> dict:
    lm = model.lm
    a = lm.adapter
    info = {
        "name": model.name, "source": model.source, "family": a.family,
        "model_type": model.config.model_type, "layers": lm.num_layers, "hidden_size": lm.hidden_size,
        "heads": a.num_heads, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
        "vocab_size": lm.vocab_size, "context": lm.max_positions, "dtype": str(lm.dtype).replace("torch.", ""),
        "weights": lm.weights, "device": str(lm.device), "params": lm.param_counts(),
    }
    if model.heads is not None:
        info["exit_heads"] = model.heads.describe()
    return info


def run(args: argparse.Namespace) -> int:
    from exitspec.runtime.profile import step_costs

    model = load_from_args(args)
    info = describe(model)
    if not args.no_profile:
        info["step_costs"] = step_costs(model.lm, context=args.context)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info.pop("params")
    costs = info.pop("step_costs", None)
    heads = info.pop("exit_heads", None)
    for k, v in info.items():
        print(f"{k:>12}: {v}")
    print(f"{'params':>12}: {p['total'] / 1e6:.1f} M total; {p['per_layer'] / 1e6:.2f} M per layer x "
          f"{model.lm.num_layers}; LM head {p['lm_head'] / 1e6:.1f} M"
          f"{' (tied to the embedding)' if p['tied_embeddings'] else ''}")
    if heads:
        print(f"{'exit heads':>12}: {heads}")
    if costs:
        print(f"\ndecode step after {args.context} cached tokens (median ms):")
        print(f"{'k':>3} {'step':>8} {'embed':>7} {'layers':>8} {'/layer':>7} {'norm+head':>10} {'vs k=1':>7}")
        for r in costs:
            print(f"{r['k']:>3} {r['step_ms']:8.2f} {r['embed_ms']:7.2f} {r['layers_ms']:8.2f} "
                  f"{r['per_layer_ms']:7.2f} {r['head_ms']:10.2f} {r['vs_k1']:7.2f}x")
    return 0
