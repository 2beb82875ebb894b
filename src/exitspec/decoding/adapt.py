"""SEDAC's run-time adaptation: each request moves its exits' thresholds by its own prompt's difficulty.

Why: a calibrated threshold holds its target agreement on the calibration data's mix of text, but a
given request may be easier (its exits agree with the full model more often at the same confidence)
or harder. SEDAC (Semantic Entropy Dynamic Acceleration Core; github.com/CARBON-XXX/SEDAC-V7.0-Pre-
release-Test-Version, docs/SEDAC_V6_MATH.md section 3, "Adaptive Threshold Calibration") re-estimates
each exit's threshold from freshly observed scores and moves the threshold by it with a weight
alpha. We do it once per request, from the request's own prompt:

1. Estimate. One teacher pass over the prompt's last `window` positions (plus up to CONTEXT tokens
   before them, so that the first scored positions do not start cold) gives, at every exit, the
   gate's score and whether the exit's top-1 is the full model's. tau_hat is the calibration's own
   rule applied to those positions (heads/confidence.agreement_cut): the most permissive threshold
   whose accepted positions agree with the full model at the exit's target agreement. An easy prompt
   (its exits agree often) gives a low tau_hat, a hard one a high tau_hat, "never" when no cut
   reaches the target.
2. Shift, relative to a reference. tau_hat is measured on *prompt* text, the calibrated threshold on
   the model's *answers*, and exits agree with the full model at another rate on the two (on the
   default model prompts read as much harder: blending towards the raw prompt estimate switched
   cascade off on most requests). So calibration (calibration/prompt_reference.py) runs this same
   estimate on its own prompts and stores, per exit and gate score, their median tau_hat (and the
   hardest one reached, see Censoring): the reference, a PromptReference. A request then moves the
   calibrated threshold by how much harder or easier its prompt reads than the calibration prompts
   did:
       g(tau') = g(tau) + alpha * (g(tau_hat) - reference),
   g = logit for the scores in [0, 1] (max_prob, margin, learned), log for entropy. A prompt that
   reads like the calibration prompts leaves the threshold exactly as calibrated.
   Censoring: on a short window at a high target most prompts reach no cut at all (on the default
   model most calibration prompts, at every exit), and "never" has no place in shift space (clamped
   EPS inside the range it lies logit(1 - EPS) away, so any prompt that did reach a cut moved its
   threshold to about "always exit"). So a prompt that reaches no cut is placed at the reference's
   ceiling, the hardest estimate any calibration prompt reached, and estimates beyond it are held
   there: the shift only spans what the calibration prompts showed. Where none of them reached a
   cut (the ceiling is None) an estimate cannot be placed at all and the threshold stays as
   calibrated. When most calibration prompts reach no cut the median is the ceiling: a request can
   then only read easier than they did, never harder.
   A bundle without a matching reference (calibrated before references existed, a user threshold on
   uncalibrated heads, another window or target than the reference's) falls back to the earlier
   rule, a blend towards the prompt's own estimate, g(tau') = (1 - alpha) g(tau) + alpha g(tau_hat),
   and says so once in an AdaptationFallbackWarning that names `exitspec calibrate`.
   Either way the ends of the range are fixed points: a threshold of 1.0 or 0.0 (entropy: 0.0) stays
   what the user set, a calibrated "never" value (beyond every score) stays never, and no shift
   leaves the score's range. alpha = 0 is off: the strategy never calls this module.

Where we depart from SEDAC: its estimate is a quantile of the risk scores for a target exit *rate*,
which keeps the speed-up on hard text by exiting as often there; ours targets the calibrated
*agreement*, which keeps quality (a hard prompt exits less, an easy one more), the axis on which the
lossy modes fail on the default model (issue 20).

Per row: in a batch every request gets its own thresholds (Gate.row_values), from a teacher pass
over its own prompt alone (not one pass over the padded batch, whose shapes could move the estimate
by a rounding error), so a request's thresholds do not depend on which requests share its batch.

Why a separate pass rather than the prefill's states: the prefill writes the decode cache in chunks
and keeps neither the exits' states nor the full model's logits; a pass over a bounded window (a few
dozen positions, once per request) leaves the decode cache exactly as it was, so adaptation changes
nothing but the thresholds, and teacher-forced routing (bench/routing.py) reproduces it from the
prompt alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

from exitspec.decoding.exits import CheckedExit, Gate, StrategyOptionError
from exitspec.heads.confidence import LOWER_IS_CONFIDENT, agreement_cut
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.sequences import teacher_pass

CONTEXT = 16  # tokens before the scored window, read but not scored
MIN_POSITIONS = 16  # fewer scored positions say too little: the calibrated thresholds stay
DEFAULT_WINDOW = 32
EPS = 1e-4  # an estimate is clamped this far inside its range before the logit / log
REFERENCE_KEY = "prompt_reference"  # where a threshold entry of bundle.json keeps its PromptReference


class AdaptationFallbackWarning(UserWarning):
    """Adaptation runs without a prompt reference: the earlier blend towards the prompt's estimate."""


@dataclass(frozen=True)
class Adaptation:
    """The `adapt*` options of cascade and mlp-skip (see the module docstring)."""

    strength: float  # alpha in (0, 1]: how far the prompt's difficulty moves the threshold
    window: int = DEFAULT_WINDOW  # prompt positions scored
    target: float | None = None  # agreement to hold; None: each exit's calibrated target

    def to_dict(self) -> dict:
        return {"strength": self.strength, "window": self.window, "target": self.target}


@dataclass(frozen=True)
class Reference:
    """One exit's reference for one gate score, in shift space: where a prompt reading like the
    calibration prompts lies (their median estimate) and the hardest estimate they reached (None:
    none reached a cut)."""

    median: float
    ceiling: float | None


@dataclass(frozen=True)
class PromptReference:
    """How hard the calibration prompts read at one exit: per gate score, the median over those prompts
    of the window estimate tau_hat in shift space (logit, entropy: log), a prompt with no cut counted at
    the ceiling (the hardest g(tau_hat) any of them reached; None where none did), at the window and
    target it was measured with. Kept in bundle.json under thresholds[layer][REFERENCE_KEY]."""

    window: int
    target: float
    values: dict[str, float]  # score -> median g(tau_hat) over the calibration prompts
    ceiling: dict[str, float | None]  # score -> the hardest g(tau_hat) among them (None: no prompt reached a cut)
    never: dict[str, float]  # score -> share of those prompts where no cut reached the target
    n_prompts: int  # calibration prompts long enough to estimate on (>= MIN_POSITIONS positions)

    def to_dict(self) -> dict:
        return asdict(self)

    def reference(self, score: str) -> Reference:
        return Reference(self.values[score], self.ceiling[score])

    @classmethod
    def from_dict(cls, d: dict, layer: int) -> PromptReference:
        """The stored form -> a PromptReference; a clear error for a damaged entry."""
        try:
            ref = cls(window=int(d["window"]), target=float(d["target"]),
                      values={str(k): float(v) for k, v in d["values"].items()},
                      ceiling={str(k): None if v is None else float(v) for k, v in d["ceiling"].items()},
                      never={str(k): float(v) for k, v in d.get("never", {}).items()}, n_prompts=int(d["n_prompts"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"the prompt reference of the exit at layer {layer} is malformed ({err!r}); "
                             "store it again with `exitspec calibrate --reference-only`") from err
        finite = [*ref.values.values(), *(v for v in ref.ceiling.values() if v is not None)]
        if not all(math.isfinite(v) for v in finite) or set(ref.ceiling) != set(ref.values):
            raise ValueError(f"the prompt reference of the exit at layer {layer} is malformed (non-finite values or "
                             "scores without a ceiling); store it again with `exitspec calibrate --reference-only`")
        return ref


def adaptation_option(strategy: str, adapt, adapt_window, adapt_target) -> Adaptation | None:
    """The options -> an Adaptation, or None when off (adapt = 0); impossible settings refused."""
    if isinstance(adapt, bool) or not isinstance(adapt, int | float) or not 0.0 <= adapt <= 1.0:
        raise StrategyOptionError(
            f"{strategy}: adapt is the weight in [0, 1] of each request's own difficulty estimate (0 = off, "
            f"1 = the full shift), got {adapt!r}; e.g. adapt=0.5")
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


def adaptation_references(bundle, gates: dict[int, Gate], targets: dict[int, float], adaptation: Adaptation,
                          strategy: str) -> dict[int, Reference | None]:
    """Per exit, the bundle's reference for its gate's score, window and target (None where the bundle
    holds no matching one: that exit falls back to the blend, said once in a warning)."""
    out: dict[int, Reference | None] = {}
    missing = []
    for layer, gate in gates.items():
        stored = (bundle.threshold(layer) or {}).get(REFERENCE_KEY)
        ref = PromptReference.from_dict(stored, layer) if stored is not None else None
        ok = (ref is not None and gate.score in ref.values and ref.window == adaptation.window
              and abs(ref.target - targets[layer]) < 1e-9)
        out[layer] = ref.reference(gate.score) if ok else None
        if not ok:
            have = "none" if ref is None else f"window {ref.window}, target {ref.target:g}, scores {sorted(ref.values)}"
            missing.append(f"{layer} (needs {gate.score}, window {adaptation.window}, target {targets[layer]:g}; "
                           f"stored: {have})")
    if missing:
        warnings.warn(
            f"{strategy}: no matching prompt reference for the exits at layers {'; '.join(missing)}, so their "
            "thresholds adapt by the earlier rule, a blend towards each prompt's own estimate, which reads prompt "
            "text as harder than answers. Store references with `exitspec calibrate --reference-only "
            "--adapt-window N` (keeps the thresholds), or adapt at the window and target they were stored for",
            AdaptationFallbackWarning, stacklevel=3)
    return out


def to_space(value: float | None, score: str) -> float:
    """A threshold or estimate (None: no cut reaches the target, i.e. never exit) -> shift space: the
    logit of a score in [0, 1], the log of an entropy, clamped EPS inside the range."""
    if score in LOWER_IS_CONFIDENT:  # entropy in [0, inf): never exiting is a threshold of 0
        return math.log(EPS if value is None else max(value, EPS))
    p = 1.0 - EPS if value is None else min(max(value, EPS), 1.0 - EPS)
    return math.log(p / (1.0 - p))


def from_space(z: float, score: str) -> float:
    if score in LOWER_IS_CONFIDENT:
        return math.exp(min(z, 700.0))  # beyond any entropy: exits everywhere, without overflowing
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def shift(value: float, estimate: float | None, alpha: float, score: str,
          reference: Reference | None = None) -> float:
    """The calibrated threshold `value` adapted to a prompt whose estimate is `estimate` (None: no
    threshold holds the target there, i.e. never exit): moved by alpha * (g(estimate) - median), the
    estimate held at the reference's ceiling, where the exit has a reference; else blended towards the
    estimate by weight alpha (module docstring)."""
    if score in LOWER_IS_CONFIDENT:
        if value <= 0.0:  # entropy 0 never exits, a calibrated "never" lies below 0: the setting stands
            return value
    elif not 0.0 < value < 1.0:  # never / always exit (or a calibrated "never" above 1): the setting stands
        return value
    if reference is None:
        return from_space((1 - alpha) * _space_of(value, score) + alpha * to_space(estimate, score), score)
    if reference.ceiling is None:  # no calibration prompt reached a cut: nothing to place an estimate by
        return value
    if estimate is None:
        z_est = reference.ceiling
    else:  # held at the ceiling: harder is a larger logit, a smaller log-entropy
        hold = max if score in LOWER_IS_CONFIDENT else min
        z_est = hold(to_space(estimate, score), reference.ceiling)
    delta = alpha * (z_est - reference.median)
    if delta == 0.0:  # the prompt reads like the calibration prompts: exactly the calibrated value, no round trip
        return value
    return from_space(_space_of(value, score) + delta, score)


def _space_of(value: float, score: str) -> float:
    """A threshold strictly inside its range -> shift space (not clamped: a threshold is no estimate)."""
    return math.log(value) if score in LOWER_IS_CONFIDENT else math.log(value / (1.0 - value))


def prompt_window(prompt: list[int], window: int) -> tuple[torch.Tensor, int]:
    """A prompt's last window + CONTEXT tokens -> ids (1, T) and how many of them, the last ones, are
    scored (up to `window`)."""
    tail = prompt[-(window + CONTEXT):]
    return torch.tensor([tail]), min(window, len(tail))


@dataclass
class WindowPass:
    """One prompt's window, teacher-forced: at each scored position the exits' hidden states and the
    full model's top-1."""

    hidden: dict[int, torch.Tensor]  # exit layer -> (n, C)
    full_top: torch.Tensor  # (n,) long
    positions: int  # tokens the pass ran (scored + context)


@torch.inference_mode()
def window_pass(lm: LayeredModel, prompt: list[int], window: int, layers: list[int]) -> WindowPass | None:
    """The teacher pass of one prompt's window (prompt_window); None where it scores fewer than
    MIN_POSITIONS positions (a short prompt says too little)."""
    ids, n = prompt_window(prompt, window)
    if n < MIN_POSITIONS:
        return None
    T = ids.shape[1]
    tp = teacher_pass(lm, ids, layers, logits_from=T - n)  # (1, n, V): no LM head on the context
    return WindowPass({layer: tp.hidden[layer][0, T - n:] for layer in layers}, tp.logits[0].argmax(-1), T)


def window_estimate(values: torch.Tensor, agree: torch.Tensor, target: float, score: str) -> float | None:
    """tau_hat: the most permissive threshold of `score` holding `target` agreement on a window's
    positions, values (n,), agree (n,) bool; None where no cut reaches it."""
    cut = agreement_cut(values, agree, target, score)
    return None if cut is None else cut[0]


@torch.inference_mode()
def adapted_thresholds(lm: LayeredModel, exits: list[CheckedExit], base: dict[int, Gate], targets: dict[int, float],
                       references: dict[int, Reference | None], prompts: list[list[int]],
                       adaptation: Adaptation) -> tuple[dict[int, list[float]], dict[str, float]]:
    """Per exit, each prompt's (row's) adapted threshold, from its own window (a row whose window is
    too short keeps the base value), and the passes' work ({"layers": decoder layer-equivalents,
    "heads": LM-head rows}, for the bench's cost split)."""
    out: dict[int, list[float]] = {ex.layer: [] for ex in exits}
    layers = heads = 0.0
    for prompt in prompts:
        wp = window_pass(lm, prompt, adaptation.window, [ex.layer for ex in exits])
        if wp is None:
            for ex in exits:
                out[ex.layer].append(base[ex.layer].value)
            continue
        n = len(wp.full_top)
        for ex in exits:
            gate, h = base[ex.layer], wp.hidden[ex.layer]  # (n, C)
            logits = ex.head(h[:, None])[:, 0]  # (n, V)
            est = window_estimate(gate.values(logits, h), logits.argmax(-1) == wp.full_top, targets[ex.layer],
                                  gate.score)
            out[ex.layer].append(shift(gate.value, est, adaptation.strength, gate.score, references.get(ex.layer)))
        layers += wp.positions * lm.num_layers
        heads += n + len(exits) * n
    return out, {"layers": layers, "heads": heads}
