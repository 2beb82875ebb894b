"""Quality measurements from teacher-forced passes over generated text (no decoding involved).

`layer_sweep` runs prompt + generated tokens through the model once, layer by layer, and compares
each exit's next-token distribution with the full model's at every generated position: KL, the
exit's own perplexity of the text, top-1 agreement (the greedy acceptance probability of a draft
from that exit) and overlap / TV at the run's temperatures (the sampling acceptance probability).
Both readings of a layer are measured: the logit lens (the model's own final norm + LM head, which
HF's and economize's early exit use) and the attached exit head when the bundle has one.

`text_nll` is the full model's negative log-likelihood of a generated text (perplexity of lossy
outputs). `fidelity` compares two runtimes of one model (the int4 loop against the dense one) the
same way, teacher-forced.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from exitspec.bench import metrics
from exitspec.decoding.sampling import SamplingParams, probs
from exitspec.runtime.sequences import scored_rows, scored_sequence, teacher_forward


def _temps_key(t: float) -> str:
    return f"overlap_T{t:g}"


@torch.inference_mode()
def layer_sweep(model, prompt: list[int], generated: list[int], layers: list[int],
                temperatures: list[float]) -> dict[str, dict[int, dict[str, float]]]:
    """Per reading ("lens", "head") and layer: sums over generated positions of kl, nll, top1 and
    overlap_T<t>, plus the count n. Sums (not means) so prompts can be pooled exactly."""
    lm, heads = model.lm, model.heads
    if not generated:
        return {}
    n = len(generated)
    exits = [layer for layer in layers if 0 < layer < lm.num_layers]
    # The one teacher forward (training.teacher.teacher_pass), rows predicting the generated tokens.
    seq = scored_sequence(prompt + generated, len(prompt))
    full, whole = teacher_forward(lm, seq, exits, whole=True)  # (n, V), {l: (T, C)}
    rows = scored_rows(seq)
    target = torch.tensor(generated, device=lm.device)  # (n,)
    temps = sorted({1.0, *[t for t in temperatures if t > 0]})
    full_p = {t: probs(full, SamplingParams(temperature=t)) for t in temps}
    full_top = full.argmax(-1)
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for layer in exits:
        readings = {"lens": lm.logits(whole[layer][rows])}
        if heads is not None and layer in getattr(heads, "layers", []):
            readings["head"] = heads.head(layer).rows(whole[layer], rows)
        for name, logits in readings.items():
            row = {"n": float(n), **_against(full, logits, target, full_top)}
            for t in temps:
                draft_p = probs(logits, SamplingParams(temperature=t))
                row[_temps_key(t)] = float(metrics.overlap(full_p[t], draft_p).sum())
            out[name][layer] = row
    return dict(out)


def _against(full: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
             full_top: torch.Tensor | None = None) -> dict[str, float]:
    """Sums over positions of `logits` (n, V) against `full` (n, V): KL(full || logits), logits' NLL
    of `target` (n,), and how often the two argmaxes agree."""
    top = full.argmax(-1) if full_top is None else full_top
    return {"kl": float(metrics.kl_divergence(full, logits).sum()),
            "nll": float(metrics.nll(logits, target).sum()),
            "top1": float((logits.argmax(-1) == top).sum())}


@torch.inference_mode()
def fidelity(reference, candidate, seqs: list[tuple[int, list[int]]]) -> dict:
    """How closely `candidate`'s next-token distributions follow `reference`'s, teacher-forced.

    seqs: (prompt length, prompt + continuation) pairs; every continuation position is scored with
    both models reading the same tokens, so one early flip does not decide the rest of the text (as
    it does for greedy-token agreement). Returns top-1 agreement, mean KL(reference || candidate) in
    nats, and each model's perplexity of the continuations."""
    tot: dict[str, float] = defaultdict(float)
    for n0, ids in seqs:
        seq = scored_sequence(ids, n0)
        a, _ = teacher_forward(reference.lm, seq, [])  # (n, V) logits predicting tokens n0..T-1
        b, _ = teacher_forward(candidate.lm, seq, [])
        target = torch.tensor(ids[n0:], device=a.device)
        for k, v in _against(a, b, target).items():
            tot[k] += v
        tot["nll_reference"] += float(metrics.nll(a, target).sum())
        tot["n"] += len(target)
    n = int(tot["n"])
    return {"tokens": n, "top1_agreement": tot["top1"] / n, "kl_nats": tot["kl"] / n,
            "perplexity_reference": metrics.perplexity(tot["nll_reference"], n),
            "perplexity_candidate": metrics.perplexity(tot["nll"], n)}


def pool_sweeps(sweeps: list[dict]) -> list[dict]:
    """Pool per-prompt sweeps into one row per (reading, layer) with means, perplexity and TV."""
    acc: dict[tuple[str, int], dict[str, float]] = {}
    for sw in sweeps:
        for reading, by_layer in sw.items():
            for layer, row in by_layer.items():
                tot = acc.setdefault((reading, int(layer)), defaultdict(float))
                for k, v in row.items():
                    tot[k] += v
    rows = []
    for (reading, layer), tot in sorted(acc.items()):
        n = tot["n"]
        row = {"reading": reading, "layer": layer, "positions": int(n), "kl": tot["kl"] / n,
               "perplexity": metrics.perplexity(tot["nll"], int(n)), "top1_agreement": tot["top1"] / n}
        for k in sorted(k for k in tot if k.startswith("overlap_T")):
            t = k[len("overlap_T"):]
            row[k] = tot[k] / n
            row[f"tv_T{t}"] = 1.0 - tot[k] / n
        rows.append(row)
    return rows


@torch.inference_mode()
def text_nll(model, prompt: list[int], generated: list[int]) -> tuple[float, int]:
    """(sum of NLL, token count) of `generated` after `prompt` under the full model."""
    lm = model.lm
    if not generated:
        return 0.0, 0
    seq = prompt + generated
    ids = torch.tensor([seq], device=lm.device)
    pos = torch.arange(len(seq), device=lm.device)[None]
    logits = lm.forward(ids, pos, lm.new_cache(1, len(seq)))[0, len(prompt) - 1: len(seq) - 1]  # (n, V)
    return float(metrics.nll(logits, torch.tensor(generated, device=lm.device)).sum()), len(generated)
