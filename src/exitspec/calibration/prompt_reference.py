"""The prompt reference of a calibrated bundle: how hard the calibration prompts read to each exit.

Run-time adaptation (decoding/adapt.py) estimates a threshold tau_hat from a request's *prompt*,
while calibration fitted the threshold on the model's *answers*; exits agree with the full model at
another rate on the two kinds of text, so the raw estimate is biased (on the default model prompts
read as much harder, and adaptation switched cascade off). The fix is to compare like with like: run
the very same window estimate (decoding/adapt.window_pass, window_estimate: one code path, so a
calibration prompt decoded later gets back exactly the reference) on the prompts of the calibration
sequences, and store per exit and per gate score the median of g(tau_hat) (logit, entropy: log) and
the hardest estimate reached (the ceiling a prompt with no cut is placed at) as a PromptReference
next to that exit's threshold. At decode time a threshold then moves by how far the
request's estimate lies from this median, not towards the estimate itself.

Every score is referenced, not only the calibrated one, so that a user who gates an exit on another
score (`score=margin threshold=...`) still adapts relative to a reference. The reference holds at the
exit's calibrated target agreement and at one window (the adapt_window to decode with).
"""

from __future__ import annotations

import statistics

import torch

from exitspec.decoding.adapt import (
    DEFAULT_WINDOW,
    MIN_POSITIONS,
    REFERENCE_KEY,
    PromptReference,
    to_space,
    window_estimate,
    window_pass,
)
from exitspec.heads.confidence import LOWER_IS_CONFIDENT, estimator_score, scores


def referenced_layers(bundle) -> list[int]:
    """The exits a reference applies to: calibrated to a target agreement, position-wise heads (the only
    ones cascade and mlp-skip read)."""
    return [layer for layer in bundle.layers
            if "target_agreement" in (bundle.threshold(layer) or {}) and not bundle.head(layer).contextual]


@torch.inference_mode()
def prompt_references(lm, bundle, prompts: list[list[int]], window: int = DEFAULT_WINDOW) -> dict[int, PromptReference]:
    """Per calibrated exit of `bundle`, the PromptReference of `prompts` (token ids, as decoding encodes
    them); prompts scoring fewer than MIN_POSITIONS positions are skipped."""
    if isinstance(window, bool) or not isinstance(window, int) or window < MIN_POSITIONS:
        raise ValueError(f"the reference window is how many prompt positions to score, an integer >= "
                         f"{MIN_POSITIONS}, got {window!r}; e.g. --adapt-window {DEFAULT_WINDOW}")
    layers = referenced_layers(bundle)
    if not layers:
        raise ValueError("no exit of this bundle is calibrated to a target agreement (or all attend over earlier "
                         "positions); calibrate it first: `exitspec calibrate --heads ... --target 0.95`")
    targets = {layer: float(bundle.threshold(layer)["target_agreement"]) for layer in layers}
    z: dict[int, dict[str, list[float | None]]] = {layer: {} for layer in layers}
    used = 0
    for prompt in prompts:
        wp = window_pass(lm, prompt, window, layers)
        if wp is None:
            continue
        used += 1
        for layer in layers:
            head, h = bundle.head(layer), wp.hidden[layer]  # (n, C)
            logits = head(h[:, None])[:, 0]  # (n, V): the call decoding's estimate makes
            agree = logits.argmax(-1) == wp.full_top
            for score, values in _gate_scores(bundle, layer, h, logits).items():
                est = window_estimate(values, agree, targets[layer], score)  # None: censored (no cut)
                z[layer].setdefault(score, []).append(None if est is None else to_space(est, score))
    if not used:
        raise ValueError(f"none of the {len(prompts)} calibration prompts has {MIN_POSITIONS} tokens, so none "
                         "says how hard prompts read; store the reference from longer prompts (--prompts)")
    return {layer: _reference(z[layer], window, targets[layer], used) for layer in layers}


def _reference(z: dict[str, list[float | None]], window: int, target: float, used: int) -> PromptReference:
    """Per score the ceiling (the hardest estimate reached) and the median with censored prompts (no
    cut) counted at the ceiling (decoding/adapt.py, "Censoring"); no cut anywhere: the range's end."""
    values, ceiling, never = {}, {}, {}
    for score, zs in sorted(z.items()):
        reached = [v for v in zs if v is not None]
        hardest = (min if score in LOWER_IS_CONFIDENT else max)(reached) if reached else None
        ceiling[score] = hardest
        values[score] = statistics.median(v if v is not None else (hardest if reached else to_space(None, score))
                                          for v in zs)
        never[score] = (len(zs) - len(reached)) / used
    return PromptReference(window=window, target=target, values=values, ceiling=ceiling, never=never, n_prompts=used)


def _gate_scores(bundle, layer: int, h: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score a gate at this exit can read, as Gate.values computes it: (n,) each."""
    out = scores(logits)
    if str(layer) in bundle.estimators:
        out["learned"] = estimator_score(bundle.estimators[str(layer)], bundle.head(layer), h, logits)
    return out


def add_prompt_references(lm, bundle, prompts: list[list[int]], window: int = DEFAULT_WINDOW) -> dict[int, dict]:
    """prompt_references() written into the bundle's threshold entries (under REFERENCE_KEY); nothing
    else of an entry changes. Returns {layer: the stored form}."""
    out = {}
    for layer, ref in prompt_references(lm, bundle, prompts, window).items():
        bundle.config.thresholds[str(layer)][REFERENCE_KEY] = out[layer] = ref.to_dict()
    return out
