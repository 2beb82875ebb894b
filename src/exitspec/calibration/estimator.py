"""Training the learned confidence estimator of one exit (a seconds-long CPU job).

Data: per token the score features, the normed hidden state and the label "exit top-1 == full
top-1" (collected by calibration/collect.py). Full-batch AdamW on binary cross-entropy; the features
are standardised with statistics stored inside the estimator.

Honest thresholds need scores the estimator did not train on, so `cross_fit` trains one estimator
per fold of *sequences* (tokens of one sequence are correlated), scores each fold with the
estimator that did not see it, and finally trains the shipped estimator on all data: the
out-of-fold scores stand in for how that estimator behaves on new text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from exitspec.heads.confidence import ConfidenceEstimator, EstimatorConfig


@dataclass
class EstimatorTrainConfig:
    proj_dim: int = 8
    mlp_dim: int = 16
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    folds: int = 2  # cross-fitting folds over sequences (at least 2)
    seed: int = 0
    inputs: str = "scores+hidden"  # or "hidden": decide before the exit's LM head (heads/confidence.py)

    def __post_init__(self) -> None:
        EstimatorConfig(hidden_size=1, proj_dim=self.proj_dim, mlp_dim=self.mlp_dim, inputs=self.inputs).check()

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny full-batch steps on one thread: with a busy CPU, intra-op thread synchronisation
    made each step many times slower than the arithmetic itself (benchmarks/README.md, 'Design
    measurements')."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def train_estimator(features: torch.Tensor, normed: torch.Tensor | None, labels: torch.Tensor,
                    cfg: EstimatorTrainConfig, hidden_size: int) -> ConfidenceEstimator:
    """features (N, F), normed (N, C) or None, labels (N,) bool -> a trained estimator (eval mode)."""
    n = labels.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to train a confidence estimator, got {n}")
    torch.manual_seed(cfg.seed)
    proj_dim = cfg.proj_dim if normed is not None else 0
    est = ConfidenceEstimator(EstimatorConfig(hidden_size=hidden_size, proj_dim=proj_dim, mlp_dim=cfg.mlp_dim,
                                              inputs=cfg.inputs))
    # Clones: the collected tensors may be inference-mode tensors, which autograd cannot save.
    feats = est.select(features).float().clone()
    est.feat_mean.copy_(feats.mean(0))
    est.feat_std.copy_(feats.std(0).clamp_min(1e-6) if n > 1 else torch.ones_like(est.feat_std))
    nh = normed.float().clone() if (normed is not None and proj_dim) else None
    y = labels.float().clone()
    if y.min() == y.max():
        # One class only: the best estimator is the constant rate; set the output bias, skip training.
        with torch.no_grad():
            for p in est.net.parameters():
                p.zero_()
            est.net[-1].bias.fill_(10.0 if bool(y[0]) else -10.0)
        return est.eval().requires_grad_(False)
    opt = torch.optim.AdamW(est.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Buffers (feat_mean / feat_std) are not parameters, so the optimiser never touches them.
    with torch.enable_grad(), single_thread():
        est.train()
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(est.logit(feats, nh), y)
            loss.backward()
            opt.step()
    return est.eval().requires_grad_(False)


def cross_fit(features: torch.Tensor, normed: torch.Tensor | None, labels: torch.Tensor,
              seq_index: torch.Tensor, cfg: EstimatorTrainConfig,
              hidden_size: int) -> tuple[ConfidenceEstimator, torch.Tensor, dict]:
    """Returns (estimator trained on all tokens, out-of-fold scores (N,), report)."""
    folds = seq_index % max(2, cfg.folds)
    if len(torch.unique(folds)) < 2:
        raise ValueError("training a learned estimator needs at least 2 calibration sequences (its threshold "
                         "is chosen on sequences it did not train on); use more prompts")
    oof = torch.full((labels.numel(),), float("nan"))
    for f in torch.unique(folds).tolist():
        held = folds == f
        est = train_estimator(features[~held], None if normed is None else normed[~held], labels[~held],
                              cfg, hidden_size)
        with torch.no_grad():
            oof[held] = est(features[held], None if normed is None else normed[held])
    final = train_estimator(features, normed, labels, cfg, hidden_size)
    with torch.no_grad():
        train_p = final(features, normed)
    y = labels.float()
    report = {"n_tokens": int(labels.numel()), "positive_rate": float(y.mean()),
              "train_bce": float(torch.nn.functional.binary_cross_entropy(train_p.clamp(1e-6, 1 - 1e-6), y)),
              "oof_bce": float(torch.nn.functional.binary_cross_entropy(oof.clamp(1e-6, 1 - 1e-6), y)),
              "oof_auc": auc(oof, labels), "train": cfg.to_dict()}
    final.config.train_report = report
    return final, oof, report


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (rank statistic, ties counted half); None with a single class."""
    labels = labels.bool()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    s = scores.double()
    # Average ranks handle ties: rank = (#smaller) + (#equal + 1) / 2.
    sorted_s, _ = torch.sort(s)
    less = torch.searchsorted(sorted_s, s, right=False).double()
    leq = torch.searchsorted(sorted_s, s, right=True).double()
    ranks = (less + leq + 1) / 2
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
