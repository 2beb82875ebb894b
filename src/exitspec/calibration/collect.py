"""Per-token statistics of every exit, gathered in one teacher forward per sequence.

For each exit layer and each scored token: KL(p_full || p_exit), cross-entropy of the label, whether
the exit's top-1 equals the full model's top-1 ("agree") and the label ("correct"), the confidence
scores, and optionally the learned estimator's inputs (score features + normed hidden, kept in fp16
to bound memory). Evaluation averages these; calibration thresholds the scores against `agree`.
Several bundles (e.g. trained heads and the norm_lm baseline) share the teacher forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitspec.heads.confidence import learned_score, position_wise, score_features, scores
from exitspec.runtime.heap import release_free_memory
from exitspec.runtime.sequences import TokenSequence, scored_rows, teacher_forward


@dataclass
class ExitTokens:
    """Per-token tensors (N,) of one exit over all scored tokens (N = total scored tokens)."""

    kl: torch.Tensor
    ce: torch.Tensor
    agree: torch.Tensor  # bool: exit top-1 == full-model top-1
    correct: torch.Tensor  # bool: exit top-1 == label (next token of the sequence)
    agree5: torch.Tensor  # bool: the full model's top-1 is among the exit's top 5
    correct5: torch.Tensor  # bool: the label is among the exit's top 5
    kl_t: torch.Tensor  # KL at the temperature the heads trained at (= kl where that is 1)
    scores: dict[str, torch.Tensor]  # max_prob, entropy, margin (+ learned when the exit has one)
    seq_index: torch.Tensor  # long: which sequence each token came from (for cross-fitting)
    features: torch.Tensor | None = None  # (N, F) score features for the learned estimator
    normed: torch.Tensor | None = None  # (N, C) fp16 normed hidden states

    @property
    def n(self) -> int:
        return int(self.kl.numel())


@dataclass
class FullTokens:
    """The full model on the same tokens: the reference row of an evaluation."""

    ce: torch.Tensor
    correct: torch.Tensor
    correct5: torch.Tensor
    entropy: torch.Tensor


@dataclass
class Collected:
    exits: dict[str, dict[int, ExitTokens]]  # bundle label -> layer -> tokens
    full: FullTokens
    n_sequences: int


def kl(full_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_full || p_exit) in nats per row: (N, V) log-probs -> (N,)."""
    return (full_logp.exp() * (full_logp - logp)).sum(-1)


def in_top5(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, V) logits, (N,) ids -> (N,) bool: the id is among the row's 5 largest logits."""
    return (logits.topk(min(5, logits.shape[-1]), dim=-1).indices == ids[:, None]).any(-1)


def token_metrics(exit_logits: torch.Tensor, full_logp: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 1.0) -> dict:
    """exit logits (N, V), full-model log-probs (N, V), labels (N,) -> per-token kl, ce, agree, correct,
    their top-5 versions, and the KL at `temperature` (the one distillation minimised: heads trained
    at T > 1 are judged on it too, besides the T = 1 KL that decoding sees)."""
    logp = torch.log_softmax(exit_logits.float(), -1)
    top1, full_top1 = logp.argmax(-1), full_logp.argmax(-1)
    kl_1 = kl(full_logp, logp)
    kl_t = kl_1 if temperature == 1.0 else kl(torch.log_softmax(full_logp / temperature, -1),
                                              torch.log_softmax(exit_logits.float() / temperature, -1))
    return {
        "kl": kl_1,
        "ce": -logp.gather(-1, labels[:, None])[:, 0],
        "agree": top1 == full_top1,
        "correct": top1 == labels,
        "agree5": in_top5(logp, full_top1),
        "correct5": in_top5(logp, labels),
        "kl_t": kl_t,
    }


def training_temperature(bundle) -> float:
    """The KD temperature a bundle's heads were trained at (1.0 when it does not say)."""
    return float(bundle.config.training.get("config", {}).get("temperature", 1.0))


def _cat(chunks: list[dict]) -> dict:
    out = {}
    for k in chunks[0]:
        if isinstance(chunks[0][k], dict):
            out[k] = _cat([c[k] for c in chunks])
        elif chunks[0][k] is None:
            out[k] = None
        else:
            out[k] = torch.cat([c[k] for c in chunks])
    return out


@torch.inference_mode()
def collect(lm, bundles: dict[str, object], sequences: list[TokenSequence], *,
            keep_features: bool = False, progress: bool = False, vocab: torch.Tensor | None = None) -> Collected:
    """Run the teacher once per sequence and gather per-token stats for every exit of every bundle.

    `lm` is a LayeredModel (or a LoadedModel); `bundles` maps a label to a HeadBundle.
    keep_features=True also keeps the learned estimator's inputs (needed to train one).
    vocab (N,) token ids (cascade's exit_vocab): the scores are those of each exit's renormalised
    distribution over these tokens and "agree" compares the subset's top-1 with the full model's, as
    such an exit decides and emits; the other statistics stay the full head's. No learned features.
    """
    if vocab is not None and keep_features:
        raise ValueError("a learned estimator reads full-vocabulary features; collect an exit vocabulary's scores "
                         "without keep_features")
    lm = getattr(lm, "lm", lm)
    if not sequences:
        raise ValueError("no sequences to evaluate on; check the prompt set (it may be empty)")
    if not bundles:
        raise ValueError("no head bundle to evaluate")
    layers = sorted({layer for b in bundles.values() for layer in b.layers})
    per: dict[str, dict[int, list[dict]]] = {name: {layer: [] for layer in b.layers} for name, b in bundles.items()}
    full_chunks = []
    for si, seq in enumerate(sequences):
        full_logits, whole = teacher_forward(lm, seq, layers, whole=True)  # (N, V), {layer: (T, C)}
        rows = scored_rows(seq)
        labels = torch.tensor(seq.ids[seq.start:], device=full_logits.device)  # (N,)
        full_logp = torch.log_softmax(full_logits.float(), -1)  # (N, V)
        full_top1 = full_logp.argmax(-1)
        full_p = full_logp.exp()
        full_chunks.append({"ce": -full_logp.gather(-1, labels[:, None])[:, 0], "correct": full_top1 == labels,
                            "correct5": in_top5(full_logp, labels), "entropy": -(full_p * full_logp).sum(-1)})
        for name, bundle in bundles.items():
            for layer in bundle.layers:
                head = bundle.head(layer)
                h = whole[layer][rows]  # (N, C)
                logits = head.rows(whole[layer], rows)  # (N, V)
                sc = scores(logits if vocab is None else logits[:, vocab])
                if str(layer) in bundle.estimators and vocab is None:
                    sc["learned"] = learned_score(bundle, layer, h[None], logits[None])[0]
                row = {
                    **token_metrics(logits, full_logp, labels, training_temperature(bundle)),
                    "scores": {k: v.cpu() for k, v in sc.items()},
                    "seq_index": torch.full_like(labels, si),
                    "features": score_features(h[None], logits[None])[0] if keep_features else None,
                    "normed": position_wise(head).normed(h[None])[0].half() if keep_features else None,
                }
                if vocab is not None:  # the token such an exit emits: the subset's top-1
                    row["agree"] = vocab[logits[:, vocab].argmax(-1)] == full_top1
                per[name][layer].append({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in row.items()})
        # This sequence's (N, V) tensors are freed; what it keeps would pin their pages (runtime/heap.py).
        release_free_memory()
        if progress:
            print(f"  teacher forward {si + 1}/{len(sequences)} ({seq.n_scored} scored tokens)", flush=True)
    exits = {name: {layer: ExitTokens(**_cat(chunks)) for layer, chunks in by_layer.items()}
             for name, by_layer in per.items()}
    full = FullTokens(**_cat([{k: v.cpu() for k, v in c.items()} for c in full_chunks]))
    return Collected(exits=exits, full=full, n_sequences=len(sequences))
