"""Calibrating a bundle: per exit, pick a confidence score and threshold, store them in the bundle.

    data = collect(model.lm, {"heads": bundle}, sequences, keep_features=True).exits["heads"]
    report = calibrate_bundle(bundle, data, target=0.95, score="auto")
    bundle.save(out_dir)   # atomic

Each exit gets `bundle.config.thresholds[str(layer)] = {"score", "value", "target_agreement",
"coverage", "agreement", "n_tokens", "candidates": {score: {...}}, "data": {...}}`, to which
`exitspec calibrate` adds "prompt_reference" (calibration/prompt_reference.py). With score="auto"
every fixed score and (when features were collected) a learned estimator compete on coverage at the
target agreement; the learned one is scored out-of-fold so it does not win by overfitting.
"""

from __future__ import annotations

from exitspec.calibration.collect import ExitTokens
from exitspec.calibration.estimator import EstimatorTrainConfig, cross_fit
from exitspec.calibration.thresholds import ThresholdChoice, check_target, pick_best, select_threshold
from exitspec.heads.confidence import ALL_SCORES, LOWER_IS_CONFIDENT, SCORES

SCORE_CHOICES = (*ALL_SCORES, "auto")


def calibrate_bundle(bundle, data: dict[int, ExitTokens], target: float, score: str = "auto",
                     train: EstimatorTrainConfig | None = None, data_info: dict | None = None,
                     progress: bool = False, exit_vocab: int = 0) -> dict[int, dict]:
    """Set the thresholds (and learned estimators) of every exit of `bundle`; returns the entries.
    exit_vocab: N when `data` scored an N-token exit vocabulary (collect(vocab=...)); stored with each
    threshold, so that only a cascade with the same exit_vocab uses it (decoding/exits.gates_for)."""
    target = check_target(target)
    if score not in SCORE_CHOICES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORE_CHOICES)}")
    missing = [layer for layer in bundle.layers if layer not in data]
    if missing:
        raise ValueError(f"no calibration data for exit layers {missing}")
    train = train or EstimatorTrainConfig()
    out = {}
    for layer in bundle.layers:
        tok = data[layer]
        if tok.n == 0:
            raise ValueError(f"no calibration tokens for exit layer {layer}; use more or longer prompts")
        wanted = list(SCORES) + ["learned"] if score == "auto" else [score]
        if "learned" in wanted and tok.features is None:
            if score == "learned":
                raise ValueError("the learned score needs estimator features; collect with keep_features=True")
            wanted.remove("learned")
        if "learned" in wanted and score == "auto" and len(tok.seq_index.unique()) < 2:
            wanted.remove("learned")  # cannot be cross-fitted, so its coverage would be an in-sample guess
        choices: dict[str, ThresholdChoice] = {}
        for name in wanted:
            if name == "learned":
                est, oof, rep = cross_fit(tok.features, tok.normed, tok.agree, tok.seq_index, train,
                                          bundle.head(layer).lm.hidden_size)
                bundle.set_estimator(layer, est.to(bundle.head(layer).lm.device))
                choices[name] = select_threshold(oof, tok.agree, target, name)
            else:
                choices[name] = select_threshold(tok.scores[name], tok.agree, target, name)
        best = pick_best(choices)
        entry = best.to_dict()
        entry["candidates"] = {c.score: {"value": c.value, "coverage": c.coverage, "agreement": c.agreement}
                               for c in choices.values()}
        entry["base_agreement"] = float(tok.agree.float().mean())  # agreement with no threshold
        if data_info:
            entry["data"] = dict(data_info)
        if exit_vocab:
            entry["exit_vocab"] = int(exit_vocab)
        bundle.config.thresholds[str(layer)] = entry
        out[layer] = entry
        if progress:
            cands = ", ".join(f"{c.score} {c.coverage:.1%}" for c in choices.values())
            op = "<=" if best.score in LOWER_IS_CONFIDENT else ">="
            print(f"  layer {layer:>2}: {best.score:<8} {op} {best.value:.6g} -> coverage {best.coverage:.1%} "
                  f"[{cands}]", flush=True)
    return out
