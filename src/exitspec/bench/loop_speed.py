"""Speed of the plain decoding loops on one model: HF `generate` against exitspec's vanilla loop
(dense, and over 4-bit weights with an fp32 or fp16 KV cache), the cost of a k-token step, and the
4-bit loop's fidelity to the dense model. `exitspec bench-runtime` (commands/bench_runtime.py) runs it."""

from __future__ import annotations

import statistics

import torch

from exitspec.bench import quality
from exitspec.bench.machine import describe_machine, machine_line
from exitspec.bench.metrics import first_mismatch
from exitspec.decoding.api import generate
from exitspec.runtime.clock import now
from exitspec.runtime.profile import context_costs, step_costs


def hf_generate_tps(model, ids: list[int], n: int) -> float:
    x = torch.tensor([ids], device=model.lm.device)
    t = now(x.device)
    with torch.inference_mode():
        out = model.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    dt = now(x.device) - t
    return (out.shape[1] - len(ids)) / dt


def vanilla_run(model, ids: list[int], n: int) -> tuple[float, list[int]]:
    """tokens/s of exitspec's vanilla loop on one prompt, and the tokens it generated."""
    r = generate(model, None, prompt_ids=[ids], max_new_tokens=n, ignore_eos=True)
    return r.stats.new_tokens / r.stats.total_s, r.token_ids[0]


def measure(model, fast: dict, enc: list[list[int]], n: int) -> dict:
    """HF generate and exitspec's vanilla loop on `model` (dense), and the vanilla loop of each model in
    `fast` (result key prefix -> (loaded model, title)), over the encoded prompts `enc` with exactly n
    new tokens each; step costs, and for the fast models fidelity to the dense model. -> result dict."""
    # Each run returns (tokens/s, generated tokens or None).
    runs = [("hf", lambda ids, k: (hf_generate_tps(model, ids, k), None)),
            ("vanilla", lambda ids, k: vanilla_run(model, ids, k))]
    for key, (m, _) in fast.items():
        runs.append((key, lambda ids, k, m=m: vanilla_run(m, ids, k)))
    for _, fn in runs:  # warm-up every path
        fn(enc[0], 8)
    tps: dict[str, list[float]] = {name: [] for name, _ in runs}
    tokens: dict[str, list[list[int] | None]] = {name: [] for name, _ in runs}
    for i, ids in enumerate(enc):
        # Rotate the order so no path always runs on a warmer cache.
        for name, fn in runs[i % len(runs):] + runs[: i % len(runs)]:
            speed, toks = fn(ids, n)
            tps[name].append(speed)
            tokens[name].append(toks)
        print(f"prompt {i + 1}/{len(enc)}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in tps.items()), flush=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    result = {
        "model": model.name, "machine": describe_machine(), "prompts": len(enc), "max_new_tokens": n,
        "hf_generate_tps_median": med["hf"], "vanilla_tps_median": med["vanilla"],
        "speedup_vs_hf": med["vanilla"] / med["hf"], "hf_generate_tps": tps["hf"], "vanilla_tps": tps["vanilla"],
        "step_costs": step_costs(model.lm),
    }
    result["table"] = [["HF generate", med["hf"]], [f"exitspec vanilla loop ({model.lm.dtype}, dense)", med["vanilla"]]]
    texts = [(len(ids), ids + t) for ids, t in zip(enc, tokens["vanilla"], strict=True)]
    for key, (m, title) in fast.items():
        # How far the int4 loop's greedy tokens follow the dense loop's (rounded product inputs flip near-ties).
        div = [first_mismatch(b, a) for a, b in zip(tokens["vanilla"], tokens[key], strict=True)]
        # ...and, teacher-forced on the dense loop's own texts, how far its distributions move.
        result |= {f"{key}_tps_median": med[key], f"{key}_speedup_vs_hf": med[key] / med["hf"],
                   f"{key}_tps": tps[key], f"{key}_first_divergence": div,
                   f"{key}_fidelity": quality.fidelity(model, m, texts), f"{key}_backend": m.lm.backend,
                   f"{key}_step_costs": step_costs(m.lm)}
        result["table"].append([f"exitspec vanilla loop ({title})", med[key]])
    if len(fast) > 1:
        result["context_costs"] = context_costs({key: m.lm for key, (m, _) in fast.items()})
    return result


def report(result: dict, fast: dict, n: int) -> str:
    """The markdown report of a `measure` result (fast: as given to measure)."""
    med_hf = result["hf_generate_tps_median"]
    model_name, enc_n = result["model"], result["prompts"]
    lines = [
        f"# Runtime benchmark: {model_name}", "",
        f"Machine: {machine_line(result['machine'])}", "",
        f"Greedy, {n} new tokens, {enc_n} held-out prompts, medians:", "",
        "| decoder | tokens/s | vs HF generate |", "|---|---:|---:|",
    ]
    lines += [f"| {name} | {v:.1f} | {v / med_hf:.2f}x |" for name, v in result["table"]]
    if fast:
        lines += ["", f"int4 runtime: {result['int4_backend']}."]
    for key, (_, title) in fast.items():
        same = sum(d is None for d in result[f"{key}_first_divergence"])
        firsts = sorted(d for d in result[f"{key}_first_divergence"] if d is not None)
        fid = result[f"{key}_fidelity"]
        lines += ["", f"{title}: greedy tokens equal the dense loop's on {same}/{enc_n} prompts"
                  + (f"; the others first differ at tokens {', '.join(map(str, firsts))}" if firsts else "") + ". "
                  f"Teacher-forced on the dense loop's {fid['tokens']} generated tokens: top-1 agreement with "
                  f"the dense model {fid['top1_agreement']:.1%}, KL(dense || int4) {fid['kl_nats']:.4f} nats, "
                  f"perplexity {fid['perplexity_candidate']:.3f} (dense {fid['perplexity_reference']:.3f})."]
    tables = [("dense", "step_costs")] + [(title, f"{key}_step_costs") for key, (_, title) in fast.items()]
    for title, key in tables:
        rows = result[key]
        split = "stack_products_ms" in rows[0]  # a fused stack's own split of the layers call
        lines += ["", f"One forward step after 256 cached tokens, {title} (ms, fastest of 20 interleaved rounds):", "",
                  "| k new tokens | step | layers | of which attention halves | MLP halves | norm + LM head | vs k=1 |"
                  + (" layers' products | attention | glue |" if split else ""),
                  "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if split else "")]
        lines += [f"| {r['k']} | {r['step_ms']:.2f} | {r['layers_ms']:.2f} | {r['attention_ms']:.2f} | "
                  f"{r['mlp_ms']:.2f} | {r['head_ms']:.2f} | {r['vs_k1']:.2f}x |"
                  + (f" {r['stack_products_ms']:.2f} | {r['stack_attention_ms']:.2f} | {r['stack_glue_ms']:.2f} |"
                     if split else "") for r in rows]
        if split:
            lines += ["", "The last three columns are the fused stack's own timers over its fastest layers call: "
                          "the weight products, attention over the cache, and the glue between them (norms, "
                          "RoPE, cache writes, SiLU, the products' int8 inputs)."]
    if "context_costs" in result:
        cc = {(r["runtime"], r["context"], r["k"]): r["step_ms"] for r in result["context_costs"]}
        lines += ["", "One decode step by context, int4 weights (ms, fastest of 10 interleaved rounds):", "",
                  "| cached tokens | k new tokens | fp32 KV cache | fp16 KV cache | fp16 / fp32 |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {c} | {k} | {ms:.2f} | {cc[('int4_kv16', c, k)]:.2f} | {cc[('int4_kv16', c, k)] / ms:.2f}x |"
                  for (name, c, k), ms in cc.items() if name == "int4"]
    return "\n".join(lines) + "\n"
