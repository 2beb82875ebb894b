"""`exitspec info`: the model's layout, parameters, where a decode step's time goes, and (with
--heads) what one self-spec cycle costs at each exit (decoding/spec_costs.py)."""

from __future__ import annotations

import argparse
import json

from exitspec.commands.common import add_model_args, load_from_args
from exitspec.decoding.spec_costs import exit_costs
from exitspec.runtime.profile import step_costs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, heads=True)
    p.add_argument("--no-profile", action="store_true", help="skip timing the decode step")
    p.add_argument("--context", type=int, default=256, help="cached tokens before the timed step")
    p.add_argument("--draft-len", type=int, default=None,
                   help="with --heads: drafts per self-spec cycle to cost (default: the bundle's recommended, else 2)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="with --heads: draft head vocabulary (default: the bundle's recommended; 0 = full)")
    p.add_argument("--json", action="store_true")


def describe(model) -> dict:
    lm = model.lm
    a = lm.adapter
    info = {
        "name": model.name, "source": model.source, "family": a.family,
        "model_type": model.config.model_type, "layers": lm.num_layers, "hidden_size": lm.hidden_size,
        "heads": a.num_heads, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
        "vocab_size": lm.vocab_size, "context": lm.max_positions, "dtype": str(lm.dtype).replace("torch.", ""),
        "weights": lm.weights, "kv_cache": str(lm.kv_dtype).removeprefix("torch."), "kernels": lm.backend,
        "device": str(lm.device), "params": lm.param_counts(),
    }
    if model.heads is not None:
        info["exit_heads"] = model.heads.describe()
    return info


def run(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    info = describe(model)
    if not args.no_profile:
        info["step_costs"] = step_costs(model.lm, context=args.context)
        rec = model.heads.config.recommended.get("self-spec", {}) if model.heads is not None else {}
        gamma = rec.get("draft_len", 2) if args.draft_len is None else args.draft_len
        vocab = rec.get("draft_vocab") if args.draft_vocab is None else args.draft_vocab
        if gamma < 1 or (vocab is not None and vocab < 0):
            raise ValueError(f"--draft-len must be >= 1 (got {gamma}) and --draft-vocab >= 0 (got {vocab})")
        # With no heads attached: the same costs at candidate exits, so a user sees where early exit
        # could pay (the break-even agreement) before training anything.
        info["self_spec_costs"] = exit_costs(model, gamma, vocab or None, context=args.context)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info.pop("params")
    costs = info.pop("step_costs", None)
    heads = info.pop("exit_heads", None)
    spec = info.pop("self_spec_costs", None)
    for k, v in info.items():
        print(f"{k:>12}: {v}")
    print(f"{'params':>12}: {p['total'] / 1e6:.1f} M total; {p['per_layer'] / 1e6:.2f} M per layer x "
          f"{model.lm.num_layers}; LM head {p['lm_head'] / 1e6:.1f} M"
          f"{' (tied to the embedding)' if p['tied_embeddings'] else ''}")
    if heads:
        print(f"{'exit heads':>12}: {heads}")
    if costs:
        print(f"\ndecode step after {args.context} cached tokens (ms, fastest of 20 interleaved rounds):")
        print(f"{'k':>3} {'step':>8} {'embed':>7} {'layers':>8} {'attn':>7} {'mlp':>7} {'/layer':>7} "
              f"{'norm+head':>10} {'vs k=1':>7}")
        for r in costs:
            print(f"{r['k']:>3} {r['step_ms']:8.2f} {r['embed_ms']:7.2f} {r['layers_ms']:8.2f} "
                  f"{r['attention_ms']:7.2f} {r['mlp_ms']:7.2f} {r['per_layer_ms']:7.2f} {r['head_ms']:10.2f} "
                  f"{r['vs_k1']:7.2f}x")
        if "stack_products_ms" in costs[0]:  # the fused stack's own timers over the fastest layers call
            print(f"\nof the layers, by the fused stack's own timers (ms):\n{'k':>3} {'products':>9} {'attention':>10} "
                  f"{'glue':>7}")
            for r in costs:
                print(f"{r['k']:>3} {r['stack_products_ms']:9.2f} {r['stack_attention_ms']:10.2f} "
                      f"{r['stack_glue_ms']:7.2f}")
    if spec:
        _print_spec_costs(spec, trained=heads is not None)
    return 0


def _print_spec_costs(rows: list[dict], trained: bool = True) -> None:
    r0 = rows[0]
    vocab = f"{r0['draft_vocab']}-token draft head" if r0["draft_vocab"] else "full-vocabulary draft head"
    heads = "" if trained else " (no heads attached: candidate exits, costed with the logit lens)"
    print(f"\nself-spec cycle per exit{heads}, {r0['draft_len']} drafts, {vocab} (median ms; vanilla step "
          f"{r0['vanilla_step_ms']:.2f} ms)\n  ceiling: speedup if every draft is accepted; break-even: E[accepted] "
          "and per-draft agreement that only match vanilla (a head must beat it);\n  predicted: speedup from "
          "the bundle's held-out agreement, drafts taken as independent")
    print(f"{'exit':>4} {'draft':>7} {'/step':>6} {'verify':>7} {'cycle':>7} {'ceiling':>8} {'break-even':>10} "
          f"{'needs':>6} {'agreement':>9} {'predicted':>9}")
    for r in rows:
        agree = f"{100 * r['heldout_agreement']:8.1f}%" if r["heldout_agreement"] is not None else f"{'-':>9}"
        pred = f"{r['predicted_speedup']:8.2f}x" if r["predicted_speedup"] is not None else f"{'-':>9}"
        need = r["break_even_agreement"]
        need = f"{100 * need:5.0f}%" if need is not None else f"{'never':>6}"
        print(f"{r['exit_layer']:>4} {r['draft_step_ms']:7.2f} {r['draft_step_ms'] / r['vanilla_step_ms']:6.2f} "
              f"{r['verify_ms']:7.2f} {r['cycle_ms']:7.2f} {r['ceiling_speedup']:7.2f}x "
              f"{r['break_even_accepted']:10.2f} {need} {agree} {pred}")
