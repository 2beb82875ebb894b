"""What one self-speculative cycle costs, part by part, against a vanilla step (on a warm cache).

    cycle(gamma) = (gamma + 1) x draft pass (layers 0..l [+ exit head]) + verify (layers l..L on gamma+1)

so with E[accepted] = a drafts per cycle, self-spec beats vanilla when cycle / (a + 1) < vanilla step.
`expected_speedup` turns measured costs and an acceptance rate into that ratio.
"""

from __future__ import annotations

import torch

from exitspec.decoding.draft_vocab import DraftHead
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.profile import _median_ms


@torch.inference_mode()
def step_costs(lm: LayeredModel, drafter: DraftHead, gamma: int, context: int = 256, repeats: int = 20) -> dict:
    """Median ms of a vanilla step, a draft pass (with / without head) and a verification pass."""
    dev, L, E = lm.device, lm.num_layers, drafter.layer
    cache = lm.new_cache(1, context + gamma + 2, hidden_layer=E)
    ids = torch.randint(0, lm.vocab_size, (1, context + gamma + 1), device=dev)
    pos = torch.arange(context + gamma + 1, device=dev)[None]
    lm.forward(ids[:, :context], pos[:, :context], cache)
    x1, p1 = ids[:, context:context + 1], pos[:, context:context + 1]
    xk, pk = ids[:, context:], pos[:, context:]  # gamma+1 tokens
    hk = lm.run_layers(lm.embed(xk, pk), pk, cache, 0, E)

    def vanilla():
        lm.logits(lm.run_layers(lm.embed(x1, p1), p1, cache, 0, L))

    def draft_layers():
        return lm.run_layers(lm.embed(x1, p1), p1, cache, 0, E)

    def draft():
        drafter.logits(draft_layers()[:, -1]).argmax(-1)

    def verify():
        lm.logits(lm.run_layers(hk, pk, cache, E, L)).argmax(-1)

    out = {"exit_layer": E, "draft_len": gamma, "context": context,
           "draft_vocab": None if drafter.vocab is None else int(drafter.vocab.numel()),
           "vanilla_step_ms": _median_ms(vanilla, repeats),
           "draft_layers_ms": _median_ms(draft_layers, repeats),
           "draft_step_ms": _median_ms(draft, repeats),
           "verify_ms": _median_ms(verify, repeats)}
    out["cycle_ms"] = (gamma + 1) * out["draft_layers_ms"] + gamma * (out["draft_step_ms"] - out["draft_layers_ms"]) \
        + out["verify_ms"]
    return out


def expected_speedup(costs: dict, mean_accepted: float) -> float:
    """Vanilla time per token / self-spec time per token, for E[accepted drafts per cycle]."""
    return costs["vanilla_step_ms"] * (mean_accepted + 1) / costs["cycle_ms"]
