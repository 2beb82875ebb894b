"""What one self-speculative cycle costs, part by part, against a vanilla step (on a warm cache).

    cycle(gamma) = (gamma + 1) x draft layers 0..l  +  gamma x exit head  +  verify (layers l..L on gamma+1 rows)

(the last draft pass only feeds verification its layer-l state, see self_spec.py), so with
E[accepted] = a drafts per cycle, self-spec emits a + 1 tokens per cycle and beats vanilla when
cycle / (a + 1) < one vanilla step. Why this is worth printing (`exitspec info --heads ...`): it
splits "is self-speculation slow here?" into the two questions that decide it, how cheap a draft is
and how often the exit agrees, before any benchmark is run. Even a = gamma (every draft accepted)
cannot beat vanilla by more than vanilla / draft-pass cost, so a deep exit caps the gain whatever
its heads learn.
"""

from __future__ import annotations

import torch

from exitspec.decoding.draft_vocab import DraftHead, draft_vocabulary
from exitspec.decoding.sampling import greedy_tokens
from exitspec.heads.bundle import HeadBundle
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.profile import full_step, median_ms, warm_cache


@torch.inference_mode()
def cycle_costs(lm: LayeredModel, drafter: DraftHead, gamma: int, context: int = 256, repeats: int = 20) -> dict:
    """Median ms of a vanilla step, a draft pass (with / without head) and a verification pass."""
    L, E = lm.num_layers, drafter.layer
    contextual = drafter.head.contextual  # a block head: its own layer over the kept states (heads/block.py)
    cache, ids, pos = warm_cache(lm, context, gamma + 1, hidden_layer=E,
                                 head_cache=torch.float32 if contextual else None)
    x1, p1 = ids[:, context:context + 1], pos[:, context:context + 1]
    xk, pk = ids[:, context:], pos[:, context:]  # gamma+1 tokens
    hk = lm.run_layers(lm.embed(xk, pk), pk, cache, 0, E)  # (1, gamma+1, C) what drafting keeps

    def vanilla():
        full_step(lm, x1, p1, cache)

    def draft_layers():
        return lm.run_layers(lm.embed(x1, p1), p1, cache, 0, E)

    def draft():
        h = draft_layers()
        greedy_tokens(drafter.logits(h, p1, cache) if contextual else drafter.logits(h[:, -1]))

    def verify():
        greedy_tokens(lm.logits(lm.run_layers(hk, pk, cache, E, L)))  # the argmax verification takes

    out = {"exit_layer": E, "draft_len": gamma, "context": context,
           "draft_vocab": None if drafter.vocab is None else int(drafter.vocab.numel()),
           "vanilla_step_ms": median_ms(vanilla, repeats, device=lm.device),
           "draft_layers_ms": median_ms(draft_layers, repeats, device=lm.device),
           "draft_step_ms": median_ms(draft, repeats, device=lm.device),
           "verify_ms": median_ms(verify, repeats, device=lm.device)}
    out["cycle_ms"] = (gamma + 1) * out["draft_layers_ms"] + gamma * (out["draft_step_ms"] - out["draft_layers_ms"]) \
        + out["verify_ms"]
    return out


def expected_speedup(costs: dict, mean_accepted: float) -> float:
    """Vanilla time per token / self-spec time per token, for E[accepted drafts per cycle]."""
    return costs["vanilla_step_ms"] * (mean_accepted + 1) / costs["cycle_ms"]


def break_even_accepted(costs: dict) -> float:
    """E[accepted drafts per cycle] at which self-spec only matches vanilla (> draft_len: never)."""
    return costs["cycle_ms"] / costs["vanilla_step_ms"] - 1


def iid_accepted(agreement: float, gamma: int) -> float:
    """E[accepted] of greedy drafts of gamma tokens if each agrees with the full model independently
    with probability `agreement` (drafting stops at the first disagreement): sum of agreement^i."""
    return sum(agreement ** i for i in range(1, gamma + 1))


def break_even_agreement(costs: dict, gamma: int) -> float | None:
    """Per-draft agreement at which self-spec only matches vanilla (drafts taken as independent):
    the p in [0, 1] with iid_accepted(p, gamma) = break_even_accepted; None where even p = 1 loses.
    What an exit's heads must reach on held-out text before training them is worth it."""
    need = break_even_accepted(costs)
    if need <= 0:
        return 0.0
    if iid_accepted(1.0, gamma) < need:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):  # iid_accepted rises with p: bisection to ~1e-12
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if iid_accepted(mid, gamma) < need else (lo, mid)
    return hi


def candidate_exits(num_layers: int) -> list[int]:
    """Exits to cost on a model without heads: every sixth of the depth, first to last but one."""
    return sorted({max(1, round(num_layers * i / 6)) for i in range(1, 6)})


def heldout_agreement(bundle, layer: int) -> float | None:
    """The trained exit's held-out top-1 agreement with the full model, when training measured it."""
    row = bundle.config.training.get("heldout_eval", {}).get("trained", {}).get(str(layer), {})
    return float(row["agreement"]) if row.get("agreement") is not None else None


def exit_costs(model, gamma: int, draft_vocab: int | None = None, context: int = 256,
               repeats: int = 20) -> list[dict]:
    """`cycle_costs` at every exit of the attached bundle, with the ceiling (all drafts accepted),
    the break-even E[accepted] and per-draft agreement, and, where the bundle records held-out
    agreement, the speedup that agreement predicts (drafts taken as independent, so a rough guide,
    not a measurement). Without a bundle: the same at candidate_exits, costed with the logit lens
    (a trained swiglu or linear head costs about as much), so any model shows where early exit could
    pay before a head is trained."""
    bundle = model.heads
    if bundle is None:
        if draft_vocab:
            raise ValueError("a reduced draft vocabulary is ranked from a head bundle's corpus: attach --heads, "
                             "or cost the full vocabulary")
        bundle = HeadBundle.create(model.lm, candidate_exits(model.lm.num_layers), "norm_lm")
    vocab = draft_vocabulary(model, draft_vocab, bundle) if draft_vocab else None
    rows = []
    for layer in bundle.layers:
        c = cycle_costs(model.lm, DraftHead(bundle.head(layer), vocab), gamma, context, repeats)
        c["ceiling_speedup"] = expected_speedup(c, gamma)
        c["break_even_accepted"] = break_even_accepted(c)
        c["break_even_agreement"] = break_even_agreement(c, gamma)
        agree = heldout_agreement(bundle, layer)
        c["heldout_agreement"] = agree
        c["predicted_speedup"] = None if agree is None else expected_speedup(c, iid_accepted(agree, gamma))
        rows.append(c)
    return rows
