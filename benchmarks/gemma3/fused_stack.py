"""Where Gemma 3 270M's vanilla decode step goes, and the fused Gemma 3 stack against the per-op path.

    PYTHONPATH=src python benchmarks/gemma3/fused_stack.py --out benchmarks/gemma3

One process, one load of `exitspec.load("gemma3-270m", weights="int4")`, two runtimes over the very
same packed blocks: the fused C++ stack (kernels/csrc/gemma.cpp, what the load now runs) and the
per-op path (`LayeredModel(..., fuse=False)`: models/gemma3.py's torch glue around one K-quant call
per projection, what ran before). Measured, every timing as the minimum over interleaved rounds
(fused, per-op, fused, ...; the machine is shared, so medians drift with the neighbours' load):
  * the roofline: read bandwidth of this machine (torch's sum over a 256 MB fp32 buffer, 1 and
    2 threads), bytes a vanilla step reads, and the tokens/s those allow;
  * each kernel's achieved GB/s at 1 row: the Q8_0 LM head, and per projection (q|k|v, o, gate|up,
    down, summed over the 18 layers) on the K-quant kernels;
  * a decode step split (runtime/profile.step_costs: layers, head; the fused stack's products /
    attention / glue) after 128 cached tokens;
  * vanilla greedy tokens/s, batch 1, per prompt (exitspec.generate), and whether the two runtimes
    produce the same tokens; teacher-forced fidelity of the fused stack to the per-op path (top-1
    agreement and KL of the next-token distributions over the generated sequences).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import exitspec  # noqa: E402  (after the path: runs from a checkout)
from exitspec import kernels  # noqa: E402
from exitspec.prompts import mixed_prompts  # noqa: E402
from exitspec.runtime.layered import LayeredModel  # noqa: E402
from exitspec.runtime.profile import step_costs  # noqa: E402


def best_s(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth(threads: int, repeats: int) -> float:
    """GB/s of torch's sum over a 256 MB fp32 buffer (streams it once; the sum's arithmetic is far
    below the bytes' cost), fastest of `repeats`."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    buf = torch.ones(64 * 2**20)
    s = best_s(lambda: buf.sum(), repeats)
    torch.set_num_threads(old)
    return buf.numel() * 4 / s / 1e9


def kernel_rates(lm: LayeredModel, repeats: int) -> dict:
    """GB/s at 1 row: the LM head, and each projection kind summed over the layers (kernel calls only)."""
    ops = kernels.load()
    C = lm.hidden_size
    x = torch.randn(1, C)
    head = lm._head
    out = {"head": {"MB": head.nbytes / 1e6, "ms": best_s(lambda: ops.q8_linear(x, head.kernel), repeats) * 1e3}}
    for name in ("qkv", "o", "gate_up", "down"):
        mats = [getattr(p, name) for p in lm.adapter._plans]
        xs = [torch.randn(1, m.in_features) for m in mats]

        def run(mats=mats, xs=xs):
            for m, xi in zip(mats, xs, strict=True):
                m.kernel.forward(xi)
        types = sorted({t for m in mats for t in m.types})
        out[name] = {"MB": sum(m.nbytes for m in mats) / 1e6, "ms": best_s(run, repeats) * 1e3, "types": types}
    for r in out.values():
        r["GB/s"] = r["MB"] / r["ms"]
    return out


def tokens_per_s(m, prompts: list[str], n: int) -> tuple[float, list[list[int]]]:
    toks, t = [], time.perf_counter()
    for p in prompts:
        toks += exitspec.generate(m, [p], chat=False, max_new_tokens=n, ignore_eos=True).token_ids
    return len(prompts) * n / (time.perf_counter() - t), toks


@torch.inference_mode()
def fidelity(a: LayeredModel, b: LayeredModel, seqs: list[list[int]]) -> dict:
    """Teacher-forced next-token distributions of `a` against `b` over `seqs`: top-1 agreement, mean KL(b || a)."""
    agree = total = 0
    kl = 0.0
    for s in seqs:
        ids = torch.tensor([s])
        pos = torch.arange(len(s))[None]
        la = a.forward(ids, pos, a.new_cache(1, len(s)))[0].float()
        lb = b.forward(ids, pos, b.new_cache(1, len(s)))[0].float()
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        total += len(s)
        kl += float(torch.nn.functional.kl_div(la.log_softmax(-1), lb.log_softmax(-1), log_target=True,
                                               reduction="sum"))
    return {"top1_agreement": agree / total, "mean_kl": kl / total, "positions": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for fused_stack.json")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (fused, per-op) of every timing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    fused_m = exitspec.load("gemma3-270m", weights="int4")
    fused = fused_m.lm
    per_op = LayeredModel(fused_m.model, int4=fused.adapter.int4, fuse=False)
    per_op_m = copy.copy(fused_m)
    per_op_m.lm = per_op  # the cached runtime (LoadedModel.lm), replaced before first use
    assert fused.adapter.fused and not per_op.adapter.fused
    print(f"loaded in {time.perf_counter() - t0:.0f} s; fused backend: {fused.backend}", flush=True)
    runtimes = {"fused": (fused_m, fused), "per_op": (per_op_m, per_op)}

    layer_mb = fused.layer_weight_bytes(0, fused.num_layers) / 1e6
    head_mb = fused.head_weight_bytes / 1e6
    res: dict = {"machine": {"threads": args.threads, "isa": kernels.load().ISA},
                 "bytes_per_token_MB": {"layers": layer_mb, "head": head_mb, "total": layer_mb + head_mb}}
    res["bandwidth_GBps"] = {f"{t}_threads": max(bandwidth(t, 10) for _ in range(args.rounds)) for t in (1, 2)}
    res["kernels"] = kernel_rates(fused, 20)
    print(json.dumps({k: res[k] for k in ("bytes_per_token_MB", "bandwidth_GBps", "kernels")}, indent=1), flush=True)

    steps: dict[str, list[dict]] = {k: [] for k in runtimes}
    for _ in range(args.rounds):
        for name, (_, lm) in runtimes.items():
            steps[name].append(step_costs(lm, context=128, ks=(1,), repeats=10)[0])
    res["step_ms"] = {name: {key: min(r[key] for r in rows if key in r) for key in rows[0]}
                      for name, rows in steps.items()}
    print(json.dumps(res["step_ms"], indent=1), flush=True)

    prompts = [p.text for p in mixed_prompts("heldout", per_set=(args.num_prompts + 4) // 5)[: args.num_prompts]]
    speed: dict[str, list[float]] = {k: [] for k in runtimes}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, (m, _) in runtimes.items():
            tps, toks = tokens_per_s(m, prompts, args.max_new_tokens)
            speed[name].append(tps)
            tokens[name] = toks
            print(f"{name}: {tps:.1f} tokens/s", flush=True)
    res["vanilla_tokens_per_s"] = {name: {"best": max(v), "all": v} for name, v in speed.items()}
    res["same_tokens"] = tokens["fused"] == tokens["per_op"]
    res["same_token_share"] = (sum(a == b for x, y in zip(tokens["fused"], tokens["per_op"], strict=True)
                                   for a, b in zip(x, y, strict=True)) / sum(len(x) for x in tokens["fused"]))
    enc = [fused_m.tokenizer(p)["input_ids"] + t for p, t in zip(prompts, tokens["per_op"], strict=True)]
    res["fidelity_fused_vs_per_op"] = fidelity(fused, per_op, enc)
    print(json.dumps({k: res[k] for k in ("vanilla_tokens_per_s", "same_tokens", "same_token_share",
                                          "fidelity_fused_vs_per_op")}, indent=1), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fused_stack.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
