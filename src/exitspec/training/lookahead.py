"""Training a lookahead draft head (heads/lookahead.py) on the frozen model's own final hidden states.

Data: the model's own greedy answers to training prompts (self-distillation, training/data.py), run
once through the frozen model to keep, for every answer position t, the final hidden state h_t
(before the final norm) as a unit-RMS feature f_t, in fp16 (C numbers a token). The answers are the
model's greedy text, so the token after every position is the full model's argmax there: what a
greedy verification accepts.

Objective, per window of `unroll` steps from a position t (EAGLE's two losses, and its successors'
"training-time test" of feeding the head its own output):

    f_hat_1 = head(f_t, x_{t+1});   f_hat_k = head(unit_rms(f_hat_{k-1}), x_{t+k})
    loss = sum_k decay^(k-1) [ CE(logits(f_hat_k) over the draft vocabulary, x_{t+k+1})
                               + feature_weight * smooth_l1(f_hat_k, f_{t+k}) ]

so step k is trained on the inputs it sees while drafting k deep. Targets outside the draft
vocabulary are left out of the CE term (the head cannot draft them; the feature term still counts).
The frozen LM head's rows for the draft vocabulary are read in fp32 (a 4096 x 576 slice of SmolLM2's
head is 9 MB), so training stays cheap enough for a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from exitspec.heads.lookahead import LookaheadConfig, LookaheadHead, unit_rms
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.sequences import TokenSequence
from exitspec.training.losses import VocabSubset


@dataclass(frozen=True)
class LookaheadTrainConfig:
    width: int = 1024
    draft_vocab: int = 8192
    unroll: int = 3  # drafting steps trained per window
    decay: float = 0.8  # weight of step k: decay^(k-1)
    feature_weight: float = 1.0
    epochs: float = 2.0
    batch: int = 256
    lr: float = 2e-3
    val_share: float = 0.05  # sequences held out to report drafting accuracy
    seed: int = 0

    def __post_init__(self):
        LookaheadConfig(self.width, self.draft_vocab)  # the same checks as the head's own
        if self.unroll < 1 or self.batch < 1 or not self.epochs > 0 or not self.lr > 0:
            raise ValueError("unroll and batch must be >= 1, epochs and lr > 0")
        if not 0 <= self.val_share < 1 or not 0 < self.decay <= 1 or self.feature_weight < 0:
            raise ValueError("val_share must be in [0, 1), decay in (0, 1], feature_weight >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Features:
    """Unit-RMS final features f (n, C) fp16 and the tokens (n,) at the same positions, per sequence."""

    feats: list[torch.Tensor]
    tokens: list[torch.Tensor]

    @property
    def positions(self) -> int:
        return sum(len(t) for t in self.tokens)


@torch.inference_mode()
def collect_features(lm: LayeredModel, examples: Sequence[TokenSequence],
                     progress: Callable[[int, int], None] | None = None) -> Features:
    """Each example through the frozen model (its own runtime, as decoding runs it), keeping the features
    from the position before its first answer token (the one that predicts it) to the end."""
    feats, tokens = [], []
    for i, e in enumerate(examples):
        first = max(0, e.start - 1)
        if len(e.ids) - first < 3:  # a window needs a feature, the next token and a target
            continue
        T = len(e.ids)
        cache = lm.new_cache(1, T)
        ids = torch.tensor([e.ids], device=lm.device)
        pos = torch.arange(T, device=lm.device)[None]
        h = lm.run_layers(lm.embed(ids, pos), pos, cache, 0, lm.num_layers)  # (1, T, C)
        feats.append(unit_rms(h[0, first:].float()).to(torch.float16).cpu())
        tokens.append(ids[0, first:].cpu())
        if progress is not None:
            progress(i + 1, len(examples))
    return Features(feats, tokens)


def _windows(data: Features, unroll: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every window: (starting feature (n, C), tokens x_{t+1}..x_{t+unroll+1} (n, unroll+1), target
    features f_{t+1}..f_{t+unroll} (n, unroll, C))."""
    f0, toks, ft = [], [], []
    for f, x in zip(data.feats, data.tokens, strict=True):
        n = len(x) - unroll - 1
        if n <= 0:
            continue
        idx = torch.arange(n)
        f0.append(f[idx])
        toks.append(torch.stack([x[idx + k] for k in range(1, unroll + 2)], 1))
        ft.append(torch.stack([f[idx + k] for k in range(1, unroll + 1)], 1))
    if not f0:
        raise ValueError(f"no sequence is long enough for a window of {unroll} drafting steps; give longer answers")
    return torch.cat(f0), torch.cat(toks), torch.cat(ft)


class Objective:
    """The loss and per-step accuracy of a head over windows (module docstring)."""

    def __init__(self, head: LookaheadHead, cfg: LookaheadTrainConfig):
        lm = head.lm
        self.head, self.cfg = head, cfg
        with torch.no_grad():
            self.rows = lm.lm_head.weight.detach()[head.vocab].float().clone()  # (N, C) frozen
        self.subset = VocabSubset(head.vocab, lm.vocab_size)

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> their index in the draft vocabulary, -1 outside it (not drafted, not scored)."""
        return self.subset.labels(tokens)

    def logits(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.head.lm.norm(f_hat) @ self.rows.T  # (n, N)

    def __call__(self, f0, toks, ft) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f, loss, hits = f0.float(), 0.0, []
        for k in range(toks.shape[1] - 1):
            f_hat = self.head(f, toks[:, k])
            lg = self.logits(f_hat)
            target = self.targets(toks[:, k + 1])
            ce = F.cross_entropy(lg, target, ignore_index=-1) if (target >= 0).any() else lg.sum() * 0
            reg = F.smooth_l1_loss(f_hat, ft[:, k].float())
            loss = loss + (self.cfg.decay ** k) * (ce + self.cfg.feature_weight * reg)
            hits.append((lg.argmax(-1) == target) & (target >= 0))
            f = unit_rms(f_hat)  # the next step reads the head's own guess, as drafting does
        return loss, hits


def train_lookahead(lm: LayeredModel, data: Features, vocab: torch.Tensor, cfg: LookaheadTrainConfig,
                    log: Callable[[str], None] = print, init: LookaheadHead | None = None
                    ) -> tuple[LookaheadHead, dict]:
    """A head trained on `data` (collect_features) over the draft vocabulary `vocab` (N ids), and a
    report: per drafting step, top-1 accuracy on held-out sequences and the share of windows whose
    first k drafts are all right (a chain's acceptance); top-k coverage of the first step. `init`:
    go on from this head's weights (same width and vocabulary) instead of the untrained identity."""
    torch.manual_seed(cfg.seed)
    n_val = int(round(cfg.val_share * len(data.tokens)))
    order = torch.randperm(len(data.tokens), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    val = Features([data.feats[i] for i in order[:n_val]], [data.tokens[i] for i in order[:n_val]])
    train = Features([data.feats[i] for i in order[n_val:]], [data.tokens[i] for i in order[n_val:]])
    f0, toks, ft = _windows(train, cfg.unroll)
    head = LookaheadHead(lm, LookaheadConfig(cfg.width, cfg.draft_vocab), vocab=vocab).float()
    if init is not None:
        if init.config != head.config or not torch.equal(init.vocab.cpu(), head.vocab.cpu()):
            raise ValueError(f"init head {init.config} does not match the settings {head.config} and vocabulary")
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init.state_dict().items()})
    objective = Objective(head, cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = max(1, math.ceil(cfg.epochs * len(f0) / cfg.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps):
            i = torch.randint(0, len(f0), (cfg.batch,), generator=gen)
            loss, _ = objective(f0[i], toks[i], ft[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 1000 == 0 or step == steps - 1:
                log(f"lookahead step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    head.eval().requires_grad_(False)
    report = {"train_windows": len(f0), "train_sequences": len(train.tokens), "val_sequences": len(val.tokens),
              "steps": steps, "seconds": round(time.perf_counter() - t0, 1), "settings": cfg.to_dict()}
    if val.tokens:
        report |= evaluate_lookahead(objective, val, cfg.unroll)
    return head, report


@torch.inference_mode()
def evaluate_lookahead(objective: Objective, val: Features, unroll: int, topk: Sequence[int] = (1, 2, 4, 8)) -> dict:
    f0, toks, ft = _windows(val, unroll)
    _, hits = objective(f0, toks, ft)
    chain = torch.cumprod(torch.stack(hits, 1).float(), 1).mean(0)
    first = objective.logits(objective.head(f0.float(), toks[:, 0]))
    target = objective.targets(toks[:, 1])
    top = first.topk(max(topk), -1).indices
    return {"val_windows": len(f0),
            "val_top1_by_step": [round(h.float().mean().item(), 4) for h in hits],
            "val_chain_acceptance": [round(c.item(), 4) for c in chain],
            "val_first_step_topk": {k: round((top[:, :k] == target[:, None]).any(-1).float().mean().item(), 4)
                                    for k in topk},
            "val_in_draft_vocab": round((target >= 0).float().mean().item(), 4)}
