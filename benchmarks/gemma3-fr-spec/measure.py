"""FR-Spec on Gemma 3 270M: what a draft costs with the full 262,144-row LM head and with a reduced,
frequency-ranked draft vocabulary, as counts of work and acceptance (no timings: not run in CI).

    PYTHONPATH=src python benchmarks/gemma3-fr-spec/measure.py --out benchmarks/gemma3-fr-spec

For each exit layer and draft vocabulary (full, and the N most frequent tokens of the shared prompt
sets' train split, decoding/draft_vocab.py), greedy self-spec with the logit-lens exit (or a bundle's
heads, --heads) on the same plain-text prompts (the held-out split of the shared sets; Gemma 3 270M
is a base model: chat=False): drafted and accepted tokens, every output checked token for token
against the vanilla loop on the same weights. The counts per drafted token are decoding/draft_work.py's
(weight bytes as the int4 runtime holds them, FLOPs). "Bytes per emitted token" models one row of a
cycle at batch 1 from those counts and the measured E[accepted] (as decoding/spec_costs.py splits a
cycle): (gamma + 1) passes of layers 0..l, gamma drafts' heads, one verification of layers l..L and
the full head, over E[accepted] + 1 tokens; vanilla reads every layer and the full head per token.
Coverage: the share of the vanilla loop's own tokens inside the draft vocabulary (a ceiling on how
often a subset can draft the right token).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import exitspec  # noqa: E402  (after the path: runs from a checkout)
from exitspec.decoding.draft_vocab import DraftHead, draft_vocabulary  # noqa: E402
from exitspec.decoding.draft_work import draft_work  # noqa: E402
from exitspec.decoding.exits import exit_bundle  # noqa: E402
from exitspec.prompts import mixed_prompts  # noqa: E402

MB = 1e6


def bytes_per_token(lm, work, gamma: int, mean_accepted: float) -> float:
    """Modelled weight bytes per emitted token of one row at batch 1 (see the module docstring)."""
    E, L = work.exit_layer, lm.num_layers
    draft = work.adapter_bytes + work.lm_head_bytes
    cycle = (gamma + 1) * work.layer_bytes + gamma * draft + lm.layer_weight_bytes(E, L) + lm.head_weight_bytes
    return cycle / (mean_accepted + 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json")
    ap.add_argument("--exits", default="6,9,12,15", help="exit layers, comma-separated")
    ap.add_argument("--vocabs", default="0,8192,16384,32768", help="draft vocabulary sizes; 0 = the full head")
    ap.add_argument("--draft-len", default="3", help="drafts per verification, comma-separated")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--heads", default=None,
                    help="an exit-head bundle folder, or 'default' (the one shipped for Gemma 3 270M); default: the "
                         "logit lens")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exits = [int(x) for x in args.exits.split(",")]
    sizes = [int(x) for x in args.vocabs.split(",")]
    gammas = [int(x) for x in args.draft_len.split(",")]

    model = exitspec.load("gemma3-270m", weights="int4", heads=args.heads)
    lm = model.lm
    print(f"[fr-spec] {model.name}: {lm.num_layers} layers, vocabulary {lm.vocab_size}; {lm.backend}", flush=True)
    prompts = [p.text for p in mixed_prompts("heldout", per_set=(args.num_prompts + 4) // 5)[: args.num_prompts]]
    run = dict(chat=False, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    ref = exitspec.generate(model, prompts, **run).token_ids
    vanilla_bytes = lm.layer_weight_bytes(0, lm.num_layers) + lm.head_weight_bytes
    vocabs = {n: (draft_vocabulary(model, n) if n else None) for n in sizes}
    made = [t for row in ref for t in row]
    sets = {n: None if v is None else set(v.tolist()) for n, v in vocabs.items()}
    coverage = {n: 1.0 if v is None else sum(t in v for t in made) / len(made) for n, v in sets.items()}
    rows = []
    for layer in exits:
        bundle = exit_bundle(model, [layer], contextual=True)  # the attached bundle's exit, else the logit lens
        for gamma in gammas:
            for n, vocab in vocabs.items():
                work = draft_work(DraftHead(bundle.head(layer), vocab))
                out = exitspec.generate(model, prompts, strategy="self-spec", exit_layer=layer, draft_len=gamma,
                                        draft_vocab=n or None, **run)
                s = out.stats
                row = {"exit_layer": layer, "draft_len": gamma, "draft_vocab": n or lm.vocab_size,
                       "lossless": out.token_ids == ref, "drafted": s.drafted, "accepted": s.accepted,
                       "acceptance": s.acceptance_rate, "mean_accepted": s.mean_accepted,
                       "tokens_per_step": s.tokens_per_step, "coverage": coverage[n], "work": work.to_dict(),
                       "bytes_per_token": bytes_per_token(lm, work, gamma, s.mean_accepted)}
                rows.append(row)
                print(f"[fr-spec] exit {layer} drafts {gamma} vocab {row['draft_vocab']}: acceptance "
                      f"{row['acceptance']:.3f} ({s.accepted}/{s.drafted}), draft {work.total_bytes / MB:.1f} MB "
                      f"(head {work.lm_head_bytes / MB:.1f} MB), lossless {row['lossless']}", flush=True)
    result = {"model": model.name, "backend": lm.backend, "num_layers": lm.num_layers, "vocab_size": lm.vocab_size,
              "hidden_size": lm.hidden_size, "draft_len": gammas, "prompts": prompts,
              "max_new_tokens": args.max_new_tokens, "heads": args.heads or "logit lens (norm_lm)",
              "vanilla_bytes_per_token": vanilla_bytes,
              "layer_bytes_per_token": lm.layer_weight_bytes(0, lm.num_layers),
              "head_bytes_per_token": lm.head_weight_bytes, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0 if all(r["lossless"] for r in rows) else 3


def table(result: dict) -> str:
    """The results as a markdown table."""
    lines = ["| exit | drafts | draft vocab | draft MB / token (layers + head) | head share | draft MFLOP | coverage | "
             "acceptance | E[accepted] | modelled MB / emitted token (vanilla "
             f"{result['vanilla_bytes_per_token'] / MB:.1f}) | lossless |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in result["rows"]:
        w = r["work"]
        gamma = r.get("draft_len", result["draft_len"])  # results from before several draft lengths: one for all
        lines.append(f"| {r['exit_layer']} | {gamma} | {r['draft_vocab']} | {w['total_bytes'] / MB:.1f} "
                     f"({w['layer_bytes'] / MB:.1f} + {w['lm_head_bytes'] / MB:.1f}) | {w['head_share']:.2f} | "
                     f"{w['total_flops'] / 1e6:.0f} | {r['coverage']:.3f} | {r['acceptance']:.3f} | "
                     f"{r['mean_accepted']:.2f} | {r['bytes_per_token'] / MB:.1f} | "
                     f"{'yes' if r['lossless'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
