"""The scale check: what training and self-speculation cost at the shapes early exit is meant for
(1B-8B Llama), measured on this machine with random weights of those shapes.

A model of a big model's *shape* with random weights costs what the real one costs per step and in
memory, so the questions that do not depend on what the weights say can be answered here:
  * streamed distillation: peak RSS of a few training steps must not grow with the number of
    examples (each case runs in a fresh process so that its peak is its own);
  * the self-speculation cost model: a vanilla step, the draft pass to each exit, the verification
    of k rows, and what Leviathan et al.'s expected-speedup formula then predicts at a given
    per-token agreement of the exit (drafts taken as independent: a guide, not a measurement).
An 8B shape does not fit in 24 GB at fp32, so only a few of its layers are built and the missing
layers are added from the measured per-layer cost (said so in the report).
"""

from __future__ import annotations

import resource
import tempfile
import time
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exitspec.decoding.draft_vocab import DraftHead
from exitspec.decoding.spec_costs import cycle_costs, expected_speedup, iid_accepted
from exitspec.heads.bundle import HeadBundle
from exitspec.loading import LoadedModel
from exitspec.runtime.profile import step_costs
from exitspec.runtime.sequences import TokenSequence
from exitspec.training.config import TrainConfig
from exitspec.training.trainer import Trainer

# Llama-3.x shapes (the configs' published sizes); max positions capped: the cache is preallocated.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)  # per-token agreement of an exit with the full model


def random_model(shape: dict, layers: int | None = None, seed: int = 0) -> LoadedModel:
    """A frozen fp32 model of `shape` with random weights (`layers` of them if given), no tokenizer
    beyond a pad id: nothing here reads text."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})},
                      max_position_embeddings=1024, rope_theta=500000.0, initializer_range=0.02)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=SimpleNamespace(pad_token_id=0), name="random", source="random")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_case(shape: dict, examples: int, steps: int = 3, seq_len: int = 64, batch: int = 4,
               exits: tuple[int, ...] = (4, 8), seed: int = 0) -> dict:
    """A few streamed-distillation steps of two swiglu exits on `examples` random sequences."""
    model = random_model(shape, seed=seed)
    built_mib = peak_rss_mib()
    g = torch.Generator().manual_seed(seed)
    data = [TokenSequence(torch.randint(0, shape["vocab_size"], (seq_len,), generator=g).tolist(), seq_len // 4)
            for _ in range(examples)]
    cfg = TrainConfig(model="random", layers=list(exits), kind="swiglu", head_options={"width": 256},
                      batch_size=batch, max_steps=steps, epochs=1, warmup_steps=1, checkpoint_every=0,
                      teacher="streamed", kd_topk=0, device="cpu")
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        result = Trainer(model, cfg, data, work, progress=False).train()
        wall = time.perf_counter() - t0
    return {"examples": examples, "exits": list(exits), "steps": result.steps, "batch": batch, "seq_len": seq_len,
            "step_s": wall / max(result.steps, 1), "model_built_rss_mib": built_mib, "peak_rss_mib": peak_rss_mib(),
            "final_kd": result.history[-1]["kd"]}


def _speedups(costs: dict, gamma: int) -> dict[str, float]:
    return {f"{a:.1f}": expected_speedup(costs, iid_accepted(a, gamma)) for a in ALPHAS}


def cost_model(shape: dict, exits: list[int], gamma: int = 3, repeats: int = 3, context: int = 256) -> dict:
    """Step cost by k and self-spec cycle costs at each exit, on the whole model of `shape`."""
    model = random_model(shape)
    lm = model.lm
    bundle = HeadBundle.create(lm, exits, "norm_lm")
    steps = step_costs(lm, context=context, repeats=repeats)
    cycles = []
    for layer in exits:
        c = cycle_costs(lm, DraftHead(bundle.head(layer)), gamma, context, repeats)
        c["predicted_speedup"] = _speedups(c, gamma)
        cycles.append(c)
    return {"layers": lm.num_layers, "built_layers": lm.num_layers, "step_costs": steps, "cycles": cycles,
            "gamma": gamma, "extrapolated": False}


def extrapolated_cost_model(shape: dict, built: int, exits: list[int], gamma: int = 3, repeats: int = 3,
                            context: int = 256) -> dict:
    """The cost model of a model too big to build whole: `built` of its layers are measured (step
    costs by k, split into layers and LM head) and the full depth is their per-layer cost times the
    number of layers. A draft to exit E costs E layers' 1-row cost plus a 1-row LM head; verifying
    k = gamma + 1 rows costs the other layers' k-row cost plus a k-row LM head."""
    model = random_model(shape, layers=built)
    L = shape["num_hidden_layers"]
    ks = tuple(sorted({1, 2, 4, gamma + 1, 8}))
    rows = {r["k"]: r for r in step_costs(model.lm, context=context, ks=ks, repeats=repeats)}

    def layer_ms(k: int) -> float:
        return rows[k]["layers_ms"] / built

    def full_step(k: int) -> float:
        return rows[k]["step_ms"] + (L - built) * layer_ms(k)

    steps = [{"k": k, "step_ms": full_step(k), "vs_k1": full_step(k) / full_step(1)} for k in sorted(rows)]
    cycles = []
    for E in exits:
        draft_layers = E * layer_ms(1)
        draft_step = draft_layers + rows[1]["head_ms"]
        verify = (L - E) * layer_ms(gamma + 1) + rows[gamma + 1]["head_ms"]
        c = {"exit_layer": E, "draft_len": gamma, "vanilla_step_ms": full_step(1), "draft_layers_ms": draft_layers,
             "draft_step_ms": draft_step, "verify_ms": verify,
             "cycle_ms": (gamma + 1) * draft_layers + gamma * (draft_step - draft_layers) + verify}
        c["predicted_speedup"] = _speedups(c, gamma)
        cycles.append(c)
    return {"layers": L, "built_layers": built, "step_costs": steps, "cycles": cycles, "gamma": gamma,
            "extrapolated": True}


def report(result: dict) -> str:
    """The markdown report of `exitspec bench-scale` (result: its results.json)."""
    lines = [f"# Scale check: {', '.join(result['shapes'])}", "",
             f"Machine: {result['machine']}", "", f"Command: `{result['command']}`", ""]
    train = result.get("train", [])
    if train:
        lines += ["## Streamed distillation: memory follows the batch, not the data set", "",
                  f"{train[0]['shape']}, random weights, fp32 on the CPU, two swiglu exits {train[0]['exits']}, "
                  f"{train[0]['steps']} steps of batch {train[0]['batch']} x {train[0]['seq_len']} tokens, "
                  "teacher inside each step; each case in a fresh process.", "",
                  "| examples | step (s) | RSS after building the model (MiB) | peak RSS (MiB) |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {t['examples']} | {t['step_s']:.1f} | {t['model_built_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} |"
                  for t in train]
        lines.append("")
    for name, cm in result.get("cost_models", {}).items():
        how = (f"{cm['built_layers']} of its {cm['layers']} layers built and measured; the others added at the "
               "measured per-layer cost" if cm["extrapolated"] else f"all {cm['layers']} layers built")
        lines += [f"## Self-speculation cost model: {name} ({how})", "",
                  "| k new tokens | step (ms) | vs k=1 |", "|---:|---:|---:|"]
        lines += [f"| {r['k']} | {r['step_ms']:.1f} | {r['vs_k1']:.2f}x |" for r in cm["step_costs"]]
        g = cm["gamma"]
        lines += ["", f"Draft length {g} (one verification of {g + 1} rows per cycle); predicted speedup over "
                  "vanilla decoding at a per-token exit agreement alpha (Leviathan et al., drafts independent); "
                  f"the last two columns put the {g + 1}-row verification at its 1-row cost, the regime of a "
                  "memory-bound GPU step:", "",
                  "| exit | draft pass / vanilla step | verify / vanilla step | "
                  + " | ".join(f"alpha {a}" for a in cm["cycles"][0]["predicted_speedup"])
                  + " | alpha 0.8, flat verify | alpha 0.9, flat verify |",
                  "|---:|---:|---:|" + "---:|" * (len(cm["cycles"][0]["predicted_speedup"]) + 2)]
        for c in cm["cycles"]:
            v = c["vanilla_step_ms"]
            flat = {**c, "cycle_ms": c["cycle_ms"] - c["verify_ms"] + (v - c["draft_layers_ms"])}
            lines.append(f"| {c['exit_layer']} | {c['draft_step_ms'] / v:.2f} | {c['verify_ms'] / v:.2f} | "
                         + " | ".join(f"{s:.2f}x" for s in c["predicted_speedup"].values())
                         + f" | {expected_speedup(flat, iid_accepted(0.8, g)):.2f}x"
                         + f" | {expected_speedup(flat, iid_accepted(0.9, g)):.2f}x |")
        lines.append("")
    return "\n".join(lines) + "\n"
