"""Confidence of an exit's next-token distribution: should a decoder trust this exit's top-1 token?

Three fixed scores read the exit's logits (max probability, entropy, top-2 margin). A learned
estimator (`ConfidenceEstimator`) is a tiny classifier over those scores plus a low-rank projection
of the exit's hidden state, trained to predict "the exit's argmax equals the full model's argmax";
its score is that predicted probability. With inputs="hidden" it reads the hidden state alone (its
log RMS and the projection), so a decoder can decide before it computes the exit's LM head, which
on a small model costs more than the layers an exit saves. Calibration (exitspec.calibration)
picks, per exit, one score and the threshold that reaches a target agreement; decoders then only need

    s = exit_confidence(bundle, layer, h, logits)   # (B, T)
    ok = is_confident(bundle, layer, s)             # (B, T) bool

Convention: every score but entropy is "higher = more confident"; entropy passes when *below* the
threshold. `confident()` is the one place that knows this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

SCORES = ("max_prob", "entropy", "margin")  # computed from logits alone
ALL_SCORES = (*SCORES, "learned")
LOWER_IS_CONFIDENT = frozenset({"entropy"})
# Per-token inputs of the learned estimator, besides the hidden-state projection (see features()).
SCORE_FEATURES = ("max_prob", "log_max_prob", "entropy", "margin", "second_prob", "log_hidden_rms")
# What an estimator reads: every feature above (from the exit's logits and hidden state), or only
# what the hidden state gives before any LM head runs.
ESTIMATOR_INPUTS = {"scores+hidden": SCORE_FEATURES, "hidden": ("log_hidden_rms",)}


def scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """logits (..., V) -> max_prob, entropy (nats) and top-2 margin, each (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    return {
        "max_prob": top2[..., 0],
        "entropy": -(p * logp).sum(-1),
        "margin": top2[..., 0] - top2[..., 1],
    }


def confident(score_name: str, value: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where the score passes the threshold (entropy passes when *below* it)."""
    if score_name in LOWER_IS_CONFIDENT:
        return value <= threshold
    return value >= threshold


# Cuts that accept fewer tokens than this are not considered: "3 of 3 agreed" says little (on
# SmolLM2's logit lens such a threshold held far below its target on new text).
MIN_ACCEPTED = 10


def agreement_cut(values: torch.Tensor, agree: torch.Tensor, target: float, score: str,
                  min_accepted: int = MIN_ACCEPTED) -> tuple[float, int, float] | None:
    """The most permissive threshold of `score` whose accepted tokens agree with the full model at
    >= target: values (N,) scores, agree (N,) bool -> (threshold, tokens accepted, their agreement),
    or None when no cut reaches the target.

    Sort tokens most confident first; accepting the top k gives agreement cumsum(agree)[k] / k. The
    largest k reaching the target wins, among cuts between *distinct* scores (a threshold cannot split
    ties) that accept at least min(min_accepted, N) tokens; the threshold is the k-th score itself,
    so `confident(score, values, threshold)` accepts exactly those k tokens. Calibration
    (calibration/thresholds.py) and each request's own re-calibration (decoding/adapt.py) share it."""
    values = values.detach().flatten().cpu()
    agree = agree.detach().flatten().cpu().bool()
    n = values.numel()
    sign = -1.0 if score in LOWER_IS_CONFIDENT else 1.0
    s_sorted, order = torch.sort(values.double() * sign, descending=True, stable=True)  # higher = more confident
    cum = agree[order].double().cumsum(0)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    agr = cum / k
    boundary = torch.ones(n, dtype=torch.bool)
    boundary[:-1] = s_sorted[:-1] > s_sorted[1:]  # cut after position i only between distinct scores
    # A tiny tolerance so that e.g. exactly 19/20 passes a 0.95 target despite float rounding.
    ok = boundary & (agr >= target - 1e-12) & (k >= min(min_accepted, n))
    if not bool(ok.any()):
        return None
    i = int(torch.nonzero(ok)[-1])
    return float(values[order[i]]), i + 1, float(agr[i])  # the original (float32) score: comparisons stay exact


def score_features(h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, T, C) hidden, (B, T, V) logits -> (B, T, len(SCORE_FEATURES)) float32 features."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values  # (B, T, 2)
    entropy = -(p * logp).sum(-1)
    cols = [top2[..., 0], top2[..., 0].clamp_min(1e-12).log(), entropy, top2[..., 0] - top2[..., 1],
            top2[..., 1], log_hidden_rms(h)]
    return torch.stack(cols, dim=-1)


def log_hidden_rms(h: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (...): the hidden state's scale grows with depth and with "settledness"; its log
    is a cheap cue, and the only score feature that needs no LM head."""
    return h.float().pow(2).mean(-1).clamp_min(1e-12).sqrt().log()


@dataclass
class EstimatorConfig:
    """Shape of a learned estimator; saved in BundleConfig.estimators[str(layer)]."""

    hidden_size: int  # C of the base model (input of the projection)
    proj_dim: int = 8  # rank of the hidden-state projection (0 = scores only)
    mlp_dim: int = 16  # width of the hidden layer (0 = logistic regression)
    kind: str = "mlp"
    inputs: str = "scores+hidden"  # a key of ESTIMATOR_INPUTS; "hidden" decides before the LM head
    # Filled in by training, for the report only (not needed to run the estimator).
    train_report: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EstimatorConfig:
        try:
            cfg = cls(**d)
        except TypeError as err:
            raise ValueError(f"malformed estimator settings {d!r} ({err}); recalibrate the bundle") from err
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.inputs not in ESTIMATOR_INPUTS:
            raise ValueError(f"estimator inputs {self.inputs!r} is not one of {', '.join(ESTIMATOR_INPUTS)}")
        if self.inputs == "hidden" and not self.proj_dim:
            raise ValueError("an estimator that reads only the hidden state needs proj_dim > 0")


class ConfidenceEstimator(nn.Module):
    """P(exit top-1 == full-model top-1) from score features and a projection of the normed hidden.

    Input standardisation (mean / std of the score features) is a buffer, so the saved weights are
    self-contained. Runs in float32 whatever the model dtype; cost is negligible next to the head.
    """

    def __init__(self, config: EstimatorConfig):
        super().__init__()
        config.check()
        self.config = config
        names = ESTIMATOR_INPUTS[config.inputs]
        self.columns = [SCORE_FEATURES.index(n) for n in names]  # of score_features' output
        n = len(names)
        self.register_buffer("feat_mean", torch.zeros(n))
        self.register_buffer("feat_std", torch.ones(n))
        self.proj = nn.Linear(config.hidden_size, config.proj_dim, bias=False) if config.proj_dim else None
        d_in = n + config.proj_dim
        if config.mlp_dim:
            self.net = nn.Sequential(nn.Linear(d_in, config.mlp_dim), nn.GELU(), nn.Linear(config.mlp_dim, 1))
        else:
            self.net = nn.Sequential(nn.Linear(d_in, 1))

    @property
    def reads_logits(self) -> bool:
        """False where the estimator decides from the hidden state alone (before any LM head)."""
        return self.config.inputs != "hidden"

    def select(self, feats: torch.Tensor) -> torch.Tensor:
        """(N.., len(SCORE_FEATURES)) score_features -> (N.., F) the columns this estimator reads."""
        return feats[..., self.columns] if feats.shape[-1] != len(self.columns) else feats

    def inputs(self, feats: torch.Tensor, normed_h: torch.Tensor | None) -> torch.Tensor:
        """(N.., F) features (all of score_features, or just this estimator's columns), (N.., C)
        normed hidden -> (N.., F + proj_dim) standardised inputs."""
        x = (self.select(feats).float() - self.feat_mean) / self.feat_std
        if self.proj is not None:
            if normed_h is None:
                raise ValueError("this estimator reads the hidden state; pass normed_h")
            x = torch.cat([x, self.proj(normed_h.float())], dim=-1)
        return x

    def logit(self, feats: torch.Tensor, normed_h: torch.Tensor | None) -> torch.Tensor:  # (N..,)
        return self.net(self.inputs(feats, normed_h)).squeeze(-1)

    def forward(self, feats: torch.Tensor, normed_h: torch.Tensor | None) -> torch.Tensor:  # (N..,) in [0, 1]
        return torch.sigmoid(self.logit(feats, normed_h))


def position_wise(head):
    """`head`, where a learned estimator can read it: its features at a position come from that
    position alone. A head that attends over earlier positions (heads/block.py) is refused."""
    if head.contextual:
        raise ValueError(f"the {head.kind!r} head at layer {head.layer} attends over earlier positions, and "
                         "learned confidence estimators read position-wise heads; calibrate it with max_prob, "
                         "entropy or margin")
    return head


def normed_hidden(bundle, layer: int, h: torch.Tensor) -> torch.Tensor:
    """(B, T, C) exit-layer hidden -> (B, T, C) RMS-normalised features the head's LM head reads."""
    return bundle.head(layer).normed(h)


def learned_score(bundle, layer: int, h: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """(B, T) probability of agreement from the exit's learned estimator (logits may be None for
    one that reads only the hidden state)."""
    if str(layer) not in bundle.estimators:
        raise ValueError(f"exit layer {layer} has no learned confidence estimator; run "
                         "`exitspec calibrate --score learned` or use max_prob / entropy / margin")
    return estimator_score(bundle.estimators[str(layer)], bundle.head(layer), h, logits)


def estimator_score(est: ConfidenceEstimator, head, h: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """(..., C) exit hidden and (..., V) its head's logits (None where `est` reads no logits) ->
    (...) the estimator's probability that the exit agrees with the full model."""
    nh = position_wise(head).normed(h) if est.proj is not None else None
    if not est.reads_logits:
        return est(log_hidden_rms(h)[..., None], nh)
    if logits is None:
        raise ValueError("this learned estimator reads the exit's logits; pass them")
    return est(score_features(h, logits), nh)


def exit_confidence(bundle, layer: int, h: torch.Tensor, logits: torch.Tensor,
                    score: str | None = None) -> torch.Tensor:
    """Confidence of exit `layer`: (B, T, C) hidden at that layer, (B, T, V) its logits -> (B, T).

    `score` defaults to the one calibrated for this exit (bundle.threshold(layer)["score"]), else
    max_prob. The learned score needs the hidden state; the others read only the logits.
    """
    if score is None:
        th = bundle.threshold(layer)
        score = th["score"] if th else "max_prob"
    if score == "learned":
        return learned_score(bundle, layer, h, logits)
    if score not in SCORES:
        raise ValueError(f"unknown confidence score {score!r}; choose one of {', '.join(ALL_SCORES)}")
    return scores(logits)[score]


def is_confident(bundle, layer: int, score: torch.Tensor) -> torch.Tensor:
    """(B, T) score from exit_confidence -> (B, T) bool: passes this exit's calibrated threshold."""
    th = bundle.threshold(layer)
    if th is None:
        raise ValueError(f"exit layer {layer} has no calibrated threshold; run `exitspec calibrate` on "
                         f"this bundle (calibrated layers: {sorted(int(k) for k in bundle.config.thresholds)})")
    value = float(th["value"])
    if math.isnan(value):
        raise ValueError(f"threshold of exit layer {layer} is NaN; recalibrate the bundle")
    return confident(th["score"], score, value)
