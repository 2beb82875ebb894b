"""Exit heads and their confidence gates as the strategies use them.

Strategies take their heads from the bundle attached to the model (`model.heads`). Without one they
fall back to untrained `norm_lm` heads (the logit lens), so every strategy runs on any model; the
strategies that need a *calibrated* threshold (dssd, cascade, mlp-skip) then need the threshold as
an option and say so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from exitspec.decoding.draft_vocab import DraftHead, draft_vocabulary
from exitspec.heads.base import ExitHead
from exitspec.heads.bundle import BundleError, HeadBundle
from exitspec.heads.confidence import (
    ALL_SCORES,
    LOWER_IS_CONFIDENT,
    ConfidenceEstimator,
    confident,
    estimator_score,
    scores,
)
from exitspec.runtime.layered import LayeredModel


class StrategyOptionError(ValueError):
    """A strategy option is missing or impossible; the message says what to pass."""


def exit_bundle(model, layers: list[int], contextual: bool = False) -> HeadBundle:
    """The attached bundle if it has every layer in `layers`, else norm_lm heads when none is attached.
    contextual=False (a strategy that reads exits one position at a time, or at several exits) refuses
    heads that attend over earlier positions (heads/block.py): only self-spec keeps their state."""
    lm = model.lm
    for layer in layers:
        if not isinstance(layer, int) or not 0 < layer < lm.num_layers:
            raise StrategyOptionError(f"exit layer {layer!r} must be an integer in 1..{lm.num_layers - 1}")
    bundle = model.heads
    if bundle is None:
        return HeadBundle.create(lm, sorted(set(layers)), "norm_lm")
    missing = [layer for layer in layers if layer not in bundle.layers]
    if missing:
        raise BundleError(f"the attached head bundle has exits at layers {bundle.layers}, not {missing}; "
                          "pick one of those layers or train heads there")
    if not contextual:
        for layer in layers:
            if bundle.head(layer).contextual:
                raise StrategyOptionError(
                    f"the exit at layer {layer} is a {bundle.head(layer).kind!r} head, a decoder layer that attends "
                    "over earlier positions; only self-spec drafts with it: use --strategy self-spec, or a bundle of "
                    "position-wise heads (norm_lm, linear, swiglu, lm_head)")
    return bundle


def default_exit_layers(model, strategy: str) -> list[int]:
    """Exit layers to use when the user names none: the bundle's recommendation, else its layers,
    else the middle layer (untrained norm_lm heads are rarely useful much shallower)."""
    bundle = model.heads
    if bundle is not None:
        rec = bundle.config.recommended.get(strategy, {})
        if "exit_layers" in rec:
            return [int(x) for x in rec["exit_layers"]]
        if "exit_layer" in rec:
            return [int(rec["exit_layer"])]
        return list(bundle.layers)
    return [model.lm.num_layers // 2]


def as_layers(value) -> list[int]:
    """An option given as 12, "12", [8, 16] or "8,16" -> [int]."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    # Integers or their digits only: 8.5 is not rounded to 8, and true is not layer 1.
    if not value or not all((isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.isdigit())
                            for v in value):
        raise StrategyOptionError(f"exit layers must be integers, got {value!r}")
    return sorted({int(v) for v in value})


@dataclass
class Gate:
    """Confidence test of one exit: `score` of its distribution (or, for "learned", the exit's
    estimator) against a threshold."""

    score: str
    value: float
    estimator: ConfidenceEstimator | None = None  # score "learned": the exit's calibrated estimator
    head: ExitHead | None = None  # score "learned": the exit's head (its norm feeds the estimator)
    # (B,) float32: each row's own threshold, where a batch's requests adapted theirs (decoding/adapt.py);
    # None: `value` for every row. float32 like the scores, so a row kept at `value` passes exactly
    # what `value` passes (a Python float is compared in the score's float32 too).
    row_values: torch.Tensor | None = None

    def with_rows(self, values: list[float]) -> Gate:
        """This gate with one threshold per row of the batch."""
        return replace(self, row_values=torch.tensor(values, dtype=torch.float32))

    def select_rows(self, keep: list[int]) -> Gate:
        """Only the rows at batch indices `keep` stay (finished rows left the batch)."""
        return self if self.row_values is None else replace(self, row_values=self.row_values[keep])

    @property
    def needs_logits(self) -> bool:
        """False for a learned gate that reads only the hidden state: it decides before the exit's
        LM head runs, so rows that do not exit never pay for it."""
        return self.estimator is None or self.estimator.reads_logits

    def values(self, logits: torch.Tensor | None, h: torch.Tensor | None = None) -> torch.Tensor:
        """The gate's score: logits (..., V) of the exit (None where not needs_logits), h (..., C) its
        hidden state (needed by learned gates) -> (...) float."""
        if self.score == "learned":
            return estimator_score(self.estimator, self.head, h, logits)
        return scores(logits)[self.score]

    def passes(self, logits: torch.Tensor | None, h: torch.Tensor | None = None) -> torch.Tensor:
        """The same inputs as values() -> (...) bool: the score passes the threshold (row b of a batch
        its own where row_values is set; a single row's threshold broadcasts over a text's positions).
        For the scores in [0, 1] a threshold of 1.0 (or a calibrated "never" above it) passes nothing,
        not even a score of exactly 1: an fp32 softmax or sigmoid rounds to 1 on very peaked outputs, and
        thresholds above 1 are refused (check_threshold), so 1.0 is how an option says "never exit"."""
        v = self.values(logits, h)
        if self.row_values is not None:  # row b of v (B, ...) against row b's threshold
            thr = self.row_values.to(v.device).view(-1, *([1] * (v.dim() - 1)))
            ok = confident(self.score, v, thr)
            return ok if self.score in LOWER_IS_CONFIDENT else ok & (thr < 1.0)
        if self.score not in LOWER_IS_CONFIDENT and self.value >= 1.0:
            return torch.zeros_like(v, dtype=torch.bool)
        return confident(self.score, v, self.value)


@dataclass
class GatedExits:
    """The exits a multi-exit strategy uses: their layers, the bundle holding their heads, their gates."""

    layers: list[int]
    bundle: HeadBundle
    gates: dict[int, Gate]


def gated_exits(model, strategy: str, exit_layers=None, exit_layer=None, threshold=None,
                score: str | None = None, exit_vocab: int = 0) -> GatedExits:
    """Resolve the exit-layer options (exit_layers, or exit_layer, else the bundle's recommendation)
    into heads and confidence gates; shared by the strategies that gate on several exits."""
    chosen = exit_layers if exit_layers is not None else exit_layer
    layers = as_layers(chosen) if chosen is not None else default_exit_layers(model, strategy)
    bundle = exit_bundle(model, layers)
    return GatedExits(layers, bundle, gates_for(bundle, layers, threshold, score, strategy=strategy,
                                                exit_vocab=exit_vocab))


def check_threshold(score: str, value, strategy: str = "") -> float:
    """A threshold given as an option -> float, refused outside its score's range: [0, 1] for the
    probabilities (max_prob, margin, learned; 1.0 never exits, see Gate.passes, 0.0 always exits),
    >= 0 nats for entropy (lower passes). A calibrated bundle's own "never" value (beyond every
    observed score) is not an option and is not checked here."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StrategyOptionError(f"{strategy}: threshold must be a number, got {value!r}") from None
    if score in LOWER_IS_CONFIDENT:
        if not 0.0 <= v < float("inf"):
            raise StrategyOptionError(f"{strategy}: an {score} threshold is in nats and must be >= 0 (lower exits "
                                      f"less; 0 never exits), got {value!r}")
    elif not 0.0 <= v <= 1.0:
        raise StrategyOptionError(f"{strategy}: a {score} threshold must lie in [0, 1] (1.0 = never exit, 0.0 = "
                                  f"always exit), got {value!r}; e.g. threshold=0.9")
    return v


def _learned(bundle: HeadBundle, layer: int, strategy: str) -> dict:
    """The Gate fields of exit `layer`'s learned estimator; a clear error where it has none."""
    if str(layer) not in bundle.estimators:
        raise StrategyOptionError(f"{strategy}: the exit at layer {layer} has no learned confidence estimator; "
                                  "calibrate the bundle with `exitspec calibrate --score learned` or pass a "
                                  "score of max_prob, entropy or margin")
    return {"estimator": bundle.estimators[str(layer)], "head": bundle.head(layer)}


def per_exit(threshold, layers: list[int], strategy: str = ""):
    """A threshold option given as one value per exit, shallowest first ("0.6,0.8" or [0.6, 0.8]) ->
    {layer: value}; one value or a {layer: value} dict stays as it is."""
    if isinstance(threshold, str) and "," in threshold:
        threshold = [v for v in threshold.replace(" ", "").split(",") if v]
    if not isinstance(threshold, (list, tuple)):
        return threshold
    if len(threshold) != len(layers):
        raise StrategyOptionError(f"{strategy}: {len(threshold)} thresholds for {len(layers)} exits {layers}; pass "
                                  "one value, or one per exit, shallowest first (e.g. threshold=0.6,0.8)")
    return dict(zip(sorted(layers), threshold, strict=True))


def gates_for(bundle: HeadBundle, layers: list[int], threshold=None, score: str | None = None,
              strategy: str = "", exit_vocab: int = 0) -> dict[int, Gate]:
    """Gate per exit: `threshold` option (one value, one per exit as "0.6,0.8" / a list, or {layer: value})
    overrides the bundle's calibration. A calibrated threshold holds only for the scores it was fitted
    to: the full vocabulary's, or an N-token exit vocabulary's (`exitspec calibrate --exit-vocab N`
    stores N with it), so one stored for another `exit_vocab` (0 = full) is refused."""
    threshold = per_exit(threshold, layers, strategy)
    out = {}
    for layer in layers:
        cal = bundle.threshold(layer) or {}
        value = threshold.get(layer, threshold.get(str(layer))) if isinstance(threshold, dict) else threshold
        name = score or cal.get("score", "max_prob")
        if name not in ALL_SCORES:
            raise StrategyOptionError(f"score {name!r} is not one of {', '.join(ALL_SCORES)}")
        if value is not None:
            value = check_threshold(name, value, strategy)
        else:
            if "value" not in cal:
                raise StrategyOptionError(
                    f"{strategy} needs a calibrated confidence threshold for the exit at layer {layer}; "
                    "attach a calibrated bundle (--heads) or pass --option threshold=0.9 (max_prob)")
            value = cal["value"]
            if int(cal.get("exit_vocab", 0)) != exit_vocab:
                fitted = f"exit_vocab={cal['exit_vocab']}" if cal.get("exit_vocab") else "full-vocabulary"
                raise StrategyOptionError(
                    f"{strategy}: the bundle's threshold for the exit at layer {layer} was calibrated on {fitted} "
                    f"scores, not on {f'exit_vocab={exit_vocab}' if exit_vocab else 'the full vocabulary'}'s; "
                    "pass threshold= (one value, or one per exit, e.g. threshold=0.6,0.8) or calibrate the bundle "
                    f"with `exitspec calibrate --exit-vocab {exit_vocab}`")
            if score is not None and score != cal.get("score", "max_prob"):
                raise StrategyOptionError(f"the bundle calibrated layer {layer} with {cal.get('score')!r}; "
                                          f"pass a threshold for score {score!r} too")
        out[layer] = Gate(name, float(value), **(_learned(bundle, layer, strategy) if name == "learned" else {}))
    return out


class CheckedExit:
    """An exit head and its gate, with the gate tried first over a frequent-token subset.

    Calibrated gates are strict, so most tokens are not confident at an exit, and each of them would
    pay a full LM head there (SmolLM2: 49152 x 576, a large share of an int4 step on CPU) only to
    be sent on. The pre-check applies the gate to the exit's distribution over the N most frequent
    tokens (draft_vocab.py; 4096 rows cost N/V of the head) and only rows that pass it pay for the
    full head, whose gate still decides. Renormalised over a subset holding the top token, max-prob
    can only rise and entropy barely moves when the full distribution is as peaked as a gate demands,
    so it rejects next to nothing the full gate would accept, and what it rejects is computed deeper:
    it may cost a little speed, never quality. A learned gate that reads only the hidden state needs
    neither: it decides first, and only then does the full head run (for the token of rows that exit).
    A learned gate that reads logits is pre-checked on the subset's scores like the others.

    `vocab` (cascade's exit_vocab): the exit never runs the full head. Its logits are the subset's
    (B, N), the gate scores their renormalised distribution, and a confident row emits from it
    (token_ids maps a subset index back to its token id): an exited token costs N/V of a head per
    exit tried instead of a full one, at the price of never emitting a token outside the subset from
    an exit. A pre-check no smaller than `vocab` would test the same rows again, so it is dropped."""

    def __init__(self, head, gate: Gate, precheck: torch.Tensor | None = None, vocab: torch.Tensor | None = None):
        self.head, self.gate, self.layer = head, gate, head.layer
        if vocab is not None and precheck is not None and precheck.numel() >= vocab.numel():
            precheck = None
        self.precheck = DraftHead(head, precheck) if precheck is not None else None
        self.sub = DraftHead(head, vocab) if vocab is not None else None  # the exit's own (N,) vocabulary
        # Rows this exit ran its pre-check subset, its full LM head and its exit vocabulary for (the
        # bench's cost split).
        self.precheck_rows = 0
        self.head_rows = 0
        self.vocab_rows = 0

    @property
    def precheck_size(self) -> int | None:
        return None if self.precheck is None else int(self.precheck.vocab.numel())

    @property
    def vocab(self) -> torch.Tensor | None:
        """(N,) token ids an exit emits from (exit_vocab), None for the full vocabulary."""
        return None if self.sub is None else self.sub.vocab

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, C) -> the exit's logits: (B, V) from the full head, (B, N) over `vocab`."""
        if self.sub is None:
            self.head_rows += h.shape[0]
            return self.head(h[:, None])[:, 0]
        self.vocab_rows += h.shape[0]
        return self.sub.logits(h)

    def token_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices into this exit's logits (from sample / argmax) -> token ids."""
        return idx if self.sub is None else self.sub.vocab[idx]

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """This exit's logits -> (..., V): -inf outside `vocab` (a distribution that never emits them)."""
        return logits if self.sub is None else self.sub.to_full(logits, self.head.lm.vocab_size)

    def confident(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (B, C) at this exit, rows (B,) bool still undecided (default: all) -> (confident (B,) bool,
        the exit's logits: the full head's (B, V), or (B, N) over `vocab`; None where no row got that
        far)."""
        if rows is None:
            rows = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        if not self.gate.needs_logits:
            rows = rows & self.gate.passes(None, h)  # from the hidden state alone: no head yet
            if not bool(rows.any()):
                return rows, None
            return rows, self._logits(h)
        if self.precheck is not None:
            self.precheck_rows += h.shape[0]
            rows = rows & self.gate.passes(self.precheck.logits(h), h)  # (B, N) logits: cheap
            if not bool(rows.any()):
                return rows, None
        logits = self._logits(h)
        return self.gate.passes(logits, h) & rows, logits

    @property
    def precheck_share(self) -> float:
        """What one pre-check row costs in full LM-head rows (N / V)."""
        return 0.0 if self.precheck is None else self.precheck_size / self.head.lm.vocab_size

    @property
    def vocab_share(self) -> float:
        """What one exit-vocabulary row costs in full LM-head rows (N / V)."""
        return 0.0 if self.sub is None else self.sub.vocab.numel() / self.head.lm.vocab_size


def precheck_vocabulary(model, precheck_vocab, bundle: HeadBundle, strategy: str) -> torch.Tensor | None:
    """The `precheck_vocab` option (a number of tokens, 0 = off, or token ids) -> (N,) ids or None. A
    number is ignored where the model's vocabulary is not at least twice as large."""
    if isinstance(precheck_vocab, (list, tuple)):
        return draft_vocabulary(model, list(precheck_vocab), bundle)
    if isinstance(precheck_vocab, bool) or not isinstance(precheck_vocab, int) or precheck_vocab < 0:
        raise StrategyOptionError(f"{strategy}: precheck_vocab must be a number of tokens >= 0 (0 = off) or a list "
                                  f"of token ids, got {precheck_vocab!r}")
    if not 0 < precheck_vocab <= model.lm.vocab_size // 2:
        return None
    return draft_vocabulary(model, precheck_vocab, bundle)


def gate_counts(exits: list[CheckedExit]) -> dict[str, float]:
    """The gates' work so far, in full LM-head rows: pre-check rows and exit-vocabulary rows (each
    weighted by N / V) and full-head rows over all `exits` (what the bench's cost split reads)."""
    return {"precheck_heads": sum(e.precheck_rows * e.precheck_share for e in exits),
            "exit_heads": float(sum(e.head_rows for e in exits)),
            "vocab_heads": sum(e.vocab_rows * e.vocab_share for e in exits)}


def head_cost(lm: LayeredModel) -> float:
    """The LM head's parameters in decoder layers' (a decode step reads every weight it uses once,
    so on a memory-bound CPU this is roughly what one head row costs in layer-equivalents). A count of
    parameters, not bytes: with weights="int4" the head's 8-bit codes weigh about twice a 4-bit
    layer's per parameter, so there a head row costs more than this says."""
    blk = lm.adapter.layers[0]
    return lm.lm_head.weight.numel() / sum(p.numel() for p in blk.parameters())


def attention_share(lm: LayeredModel) -> float:
    """Fraction of a decoder layer's parameters outside its MLP (what a layer costs with the MLP skipped)."""
    blk = lm.adapter.layers[0]
    total = sum(p.numel() for p in blk.parameters())
    mlp = sum(p.numel() for p in blk.mlp.parameters())  # llama, gpt_neox and gpt2 blocks all name it `mlp`
    return (total - mlp) / total
