"""A lookahead draft head: the next position's final hidden state, from this one's and the token between.

Exit heads (kinds.py) draft from an early layer, so every draft still pays for the layers below the
exit, and on a small model an exit deep enough to agree with the full model (SmolLM2-135M: layer 24
of 30) costs most of a step. A lookahead head drafts from the LAST layer instead: after a
verification the full model's final hidden state h_t at the last accepted position is already
computed, and so is the token x_{t+1} it chose. The head maps (h_t, x_{t+1}) to a guess of h_{t+1},
whose norm + LM head give x_{t+2}; fed its own guess and that token it goes on, one cheap step per
draft. This is EAGLE's feature-level drafting (Li et al. 2024: "EAGLE: speculative sampling requires
rethinking feature uncertainty"), here without EAGLE's attention layer: h_t already summarises the
context, and an attention-free step costs the same whatever the context length. The drafts are only
proposals: the full model verifies them, so output stays exactly vanilla's (decoding/lookahead.py).

Features: f = h / rms(h) (unit RMS, the final norm's input without its scale), so the head works at
one scale whatever the residual stream's size; the final norm is scale-free, so the LM head reads
the head's output f_hat exactly as it reads h. One step:

    z     = W_in [n_f(f) ; n_e(embed(x))]          # (B, 2C) -> (B, C)
    g, u  = gate_up(n_z(z))                        # (B, C) -> (B, W) twice, one product
    f_hat = z + down(silu(g) * u)

n_* are learnable RMS norms. W_in starts as [I, 0] and `down` at zero, so an untrained head returns
f itself: the logit lens of the current position (it then drafts the token it already chose).
Drafting reads logits over the head's `vocab` (the N most frequent tokens, FR-Spec's reduced draft
vocabulary), stored with the head so decoding uses exactly the rows it was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exitspec.runtime.layered import LayeredModel


@dataclass(frozen=True)
class LookaheadConfig:
    """The head's shape (what a bundle stores to rebuild it before loading its weights)."""

    width: int = 1024  # SwiGLU width
    draft_vocab: int = 8192  # logits over the N most frequent tokens (the ids are stored as a buffer)

    def __post_init__(self):
        for name in ("width", "draft_vocab"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"lookahead {name} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LookaheadConfig:
        known = {k: d[k] for k in ("width", "draft_vocab") if k in d}
        return cls(**known)


def unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) over the last dim: the feature a lookahead head reads and writes."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _Norm(nn.Module):
    """unit_rms(x) * weight, as one op (a drafting step is a few dozen small ops: each one counts)."""

    def __init__(self, dim: int, device, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LookaheadHead(nn.Module):
    def __init__(self, lm: LayeredModel, config: LookaheadConfig, vocab: torch.Tensor | None = None):
        super().__init__()
        C, W, N = lm.hidden_size, config.width, config.draft_vocab
        if lm.vocab_size < N:
            raise ValueError(f"lookahead draft_vocab {N} exceeds the model's vocabulary ({lm.vocab_size} tokens)")
        self.config = config
        self._base = (lm,)  # the frozen base stays out of the module tree (not saved, not trained)
        dev = lm.device
        self.n_f, self.n_e, self.n_z = _Norm(C, dev), _Norm(C, dev), _Norm(C, dev)
        self.w_in = nn.Linear(2 * C, C, bias=False, device=dev)
        self.gate_up = nn.Linear(C, 2 * W, bias=False, device=dev)
        self.down = nn.Linear(W, C, bias=False, device=dev)
        with torch.no_grad():  # untrained == the current position's logit lens (module docstring)
            self.w_in.weight.zero_()
            self.w_in.weight[:, :C].copy_(torch.eye(C, device=dev))
            self.down.weight.zero_()
        ids = torch.arange(N) if vocab is None else vocab.to(torch.long).flatten().cpu()
        if ids.numel() != N or (N and (int(ids.min()) < 0 or int(ids.max()) >= lm.vocab_size)):
            raise ValueError(f"lookahead vocab must be {N} token ids in 0..{lm.vocab_size - 1}")
        self.register_buffer("vocab", ids.to(dev))

    @property
    def lm(self) -> LayeredModel:
        return self._base[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., C) the base model's input embeddings (no positions: the head has none)."""
        # HF's input embedding table (GPT-2's positions and Gemma's sqrt(C) scale left out: n_e rescales)
        return self.lm.model.get_input_embeddings()(ids).to(self.w_in.weight.dtype)

    def linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The step's products (w_in, gate_up, down), in the order `forward(..., linears=)` takes them."""
        return self.w_in, self.gate_up, self.down

    def forward(self, f: torch.Tensor, ids: torch.Tensor, linears=None) -> torch.Tensor:
        """(..., C) unit-RMS feature at t and (...,) the token x_{t+1} -> (..., C) guessed feature at t+1.
        The feature is read through n_f, a scale-free norm, so any positive multiple of it (the raw
        hidden state, an unnormalised guess) gives the same step up to eps: drafting skips unit_rms.
        `linears`: other callables for the three products (decoding runs them on the int8 kernel)."""
        w_in, gate_up, down = linears or self.linears()
        z = w_in(torch.cat([self.n_f(f.to(self.w_in.weight.dtype)), self.n_e(self.embed(ids))], -1))
        g, u = gate_up(self.n_z(z)).chunk(2, -1)
        return z + down(F.silu(g) * u)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
