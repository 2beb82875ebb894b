"""SEDAC's run-time adaptation: each request re-calibrates its exits' thresholds on its own prompt.

Why: a calibrated threshold holds its target agreement on the calibration data's mix of text, but a
given request may be easier (its exits agree with the full model more often at the same confidence)
or harder. SEDAC (Semantic Entropy Dynamic Acceleration Core; github.com/CARBON-XXX/SEDAC-V7.0-Pre-
release-Test-Version, docs/SEDAC_V6_MATH.md section 3, "Adaptive Threshold Calibration") re-estimates
each exit's threshold from freshly observed scores and moves the threshold towards that estimate
with EMA smoothing, tau <- (1 - alpha) * tau + alpha * tau_hat. We keep that two-step shape, once per
request, from the request's own prompt:

1. Estimate. One teacher pass over the prompt's last `window` positions (plus up to CONTEXT tokens
   before them, so that the first scored positions do not start cold) gives, at every exit, the
   gate's score and whether the exit's top-1 is the full model's. tau_hat is the calibration's own
   rule applied to those positions (heads/confidence.agreement_cut): the most permissive threshold
   whose accepted positions agree with the full model at the exit's target agreement. An easy prompt
   (its exits agree often) gives a low tau_hat, a hard one a high tau_hat, "never" when no cut
   reaches the target.
2. Smooth. tau' = tau blended towards tau_hat by alpha (the `adapt` option), in logit space for the
   scores in [0, 1] (max_prob, margin, learned) and in log space for entropy. The ends of the range
   are fixed points: a threshold of 1.0 or 0.0 (entropy: 0.0) stays what the user set, a calibrated
   "never" value (beyond every score) stays never, and no blend leaves the score's range. alpha = 0
   is off: the strategy never calls this module.

Where we depart from SEDAC: its estimate is a quantile of the risk scores for a target exit *rate*,
which keeps the speed-up on hard text by exiting as often there; ours targets the calibrated
*agreement*, which keeps quality (a hard prompt exits less, an easy one more), the axis on which the
lossy modes fail on the default model (issue 20).

Why a separate pass rather than the prefill's states: the prefill writes the decode cache in chunks
and keeps neither the exits' states nor the full model's logits; a pass over a bounded window (a few
dozen positions, once per request) leaves the decode cache exactly as it was, so adaptation changes
nothing but the thresholds, and teacher-forced routing (bench/routing.py) reproduces it from the
prompt alone. In a batch the rows' prompt positions are pooled: one threshold per batch, per request
when a request decodes alone (the bench, lm-eval, `exitspec generate` with one prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from exitspec.decoding.exits import CheckedExit, Gate, StrategyOptionError
from exitspec.heads.confidence import LOWER_IS_CONFIDENT, agreement_cut
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.sequences import teacher_pass

CONTEXT = 16  # tokens before the scored window, read but not scored
MIN_POSITIONS = 16  # fewer scored positions say too little: the calibrated thresholds stay
DEFAULT_WINDOW = 32
EPS = 1e-4  # an estimate is clamped this far inside its range before the logit / log


@dataclass(frozen=True)
class Adaptation:
    """The `adapt*` options of cascade and mlp-skip (see the module docstring)."""

    strength: float  # alpha in (0, 1]: the weight of the prompt's own estimate
    window: int = DEFAULT_WINDOW  # prompt positions scored
    target: float | None = None  # agreement to hold; None: each exit's calibrated target

    def to_dict(self) -> dict:
        return {"strength": self.strength, "window": self.window, "target": self.target}


def adaptation_option(strategy: str, adapt, adapt_window, adapt_target) -> Adaptation | None:
    """The options -> an Adaptation, or None when off (adapt = 0); impossible settings refused."""
    if isinstance(adapt, bool) or not isinstance(adapt, int | float) or not 0.0 <= adapt <= 1.0:
        raise StrategyOptionError(
            f"{strategy}: adapt is the weight in [0, 1] of each request's own threshold estimate (0 = off, "
            f"1 = the prompt's estimate alone), got {adapt!r}; e.g. adapt=0.5")
    if adapt == 0:
        if adapt_window is not None or adapt_target is not None:
            raise StrategyOptionError(f"{strategy}: adapt_window and adapt_target only apply when the threshold "
                                      "adapts: pass adapt=0.5 (say) with them, or drop them")
        return None
    window = DEFAULT_WINDOW if adapt_window is None else adapt_window
    if isinstance(window, bool) or not isinstance(window, int) or window < MIN_POSITIONS:
        raise StrategyOptionError(f"{strategy}: adapt_window is how many prompt positions to score, an integer >= "
                                  f"{MIN_POSITIONS}, got {adapt_window!r}")
    if adapt_target is not None and (isinstance(adapt_target, bool) or not isinstance(adapt_target, int | float)
                                     or not 0.0 < adapt_target <= 1.0):
        raise StrategyOptionError(f"{strategy}: adapt_target is the agreement with the full model to hold, in "
                                  f"(0, 1], got {adapt_target!r}; e.g. adapt_target=0.9")
    return Adaptation(float(adapt), window, None if adapt_target is None else float(adapt_target))


def adaptation_targets(bundle, layers: list[int], adaptation: Adaptation, strategy: str) -> dict[int, float]:
    """Per exit, the agreement its adapted threshold holds: the adapt_target option, else the target the
    bundle calibrated that exit to."""
    out = {}
    for layer in layers:
        target = adaptation.target
        if target is None:
            target = (bundle.threshold(layer) or {}).get("target_agreement")
        if target is None:
            raise StrategyOptionError(f"{strategy}: the exit at layer {layer} was not calibrated to a target "
                                      "agreement, so adapting its threshold needs one: pass adapt_target=0.9 (say)")
        out[layer] = float(target)
    return out


def shift(value: float, estimate: float | None, alpha: float, score: str) -> float:
    """The calibrated threshold `value` moved towards the prompt's `estimate` (None: no threshold holds
    the target there, i.e. never exit) by weight alpha, in logit (probabilities) or log (entropy) space."""
    if score in LOWER_IS_CONFIDENT:  # entropy in [0, inf); 0 never exits and stays
        if value <= 0.0:
            return value
        est = EPS if estimate is None else max(estimate, EPS)
        return math.exp((1 - alpha) * math.log(value) + alpha * math.log(est))
    if not 0.0 < value < 1.0:  # never / always exit (or a calibrated "never" above 1): the setting stands
        return value
    est = 1.0 - EPS if estimate is None else min(max(estimate, EPS), 1.0 - EPS)
    z = (1 - alpha) * _logit(value) + alpha * _logit(est)
    return 1.0 / (1.0 + math.exp(-z))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def prompt_window(prompts: list[list[int]], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's last window + CONTEXT tokens, right-padded -> ids (B, T) and scored (B, T) bool:
    the last `window` positions of each row (fewer for a short prompt), pads excluded."""
    tails = [p[-(window + CONTEXT):] for p in prompts]
    T = max(len(t) for t in tails)
    ids = torch.tensor([t + [t[0]] * (T - len(t)) for t in tails])  # pads follow the real tokens: never attended
    scored = torch.zeros(len(tails), T, dtype=torch.bool)
    for b, t in enumerate(tails):
        scored[b, max(0, len(t) - window): len(t)] = True
    return ids, scored


@torch.inference_mode()
def adapted_gates(lm: LayeredModel, exits: list[CheckedExit], base: dict[int, Gate], targets: dict[int, float],
                  prompts: list[list[int]], adaptation: Adaptation) -> tuple[dict[int, Gate], dict[str, float]]:
    """Each exit's gate with its threshold re-calibrated on `prompts` (token ids; a row's last token
    included) and smoothed towards it, and the pass's work ({"layers": decoder layer-equivalents,
    "heads": LM-head rows}, for the bench's cost split); the base gates and no work where the prompts
    give fewer than MIN_POSITIONS scored positions."""
    ids, scored = prompt_window(prompts, adaptation.window)
    if int(scored.sum()) < MIN_POSITIONS:
        return dict(base), {"layers": 0.0, "heads": 0.0}
    tp = teacher_pass(lm, ids, [ex.layer for ex in exits])
    dev = tp.logits.device
    mask = scored.to(dev)
    full_top = tp.logits[mask].argmax(-1)  # (N,)
    out = {}
    for ex in exits:
        gate = base[ex.layer]
        h = tp.hidden[ex.layer][mask]  # (N, C)
        logits = ex.head(h[:, None])[:, 0]  # (N, V)
        cut = agreement_cut(gate.values(logits, h), logits.argmax(-1) == full_top, targets[ex.layer], gate.score)
        out[ex.layer] = replace(gate, value=shift(gate.value, None if cut is None else cut[0],
                                                  adaptation.strength, gate.score))
    positions = ids.numel()
    return out, {"layers": float(positions * lm.num_layers), "heads": float(positions + len(exits) * len(full_top))}
