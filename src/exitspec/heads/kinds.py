"""Trainable exit-head kinds. Each reads the hidden state after layer l of the frozen base.

Every kind is initialised so that, untrained, it computes exactly the `norm_lm` logit lens:
- `linear`: h -> W h + b fed to the frozen final norm + LM head; W = I, b = 0 at init.
- `swiglu`: h -> h + r(h) * down(silu(gate(n(h))) * up(n(h))) fed to the frozen norm + LM head, where
  r(h) is the RMS of h and n a learnable RMS norm. The adapter thus works at unit scale whatever the
  size of the residual stream at that depth (it grows a lot with depth), and since the final norm is
  scale-free its effect does not shrink where h is large. `down` starts at zero: untrained == norm_lm.
- `lm_head`: a tuned copy of the LM head (and its bias) over the frozen final norm. It is as big as
  the embedding (V x C), so it is a training option, never shipped in the small default bundle.
- `block`: a decoder layer of the base architecture (heads/block.py): Kangaroo's adapter
  (init "new") or the research plan's Option B, the base's next layer tuned (init "copy").
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from exitspec.heads.base import ExitHead, NormLMHead, tuned_lm_head
from exitspec.heads.block import BlockHead
from exitspec.runtime.layered import LayeredModel

# Every head kind by name (bundles store only the name + options); the trainable ones below register
# themselves with the decorator.
HEAD_KINDS: dict[str, type[ExitHead]] = {"norm_lm": NormLMHead, "block": BlockHead}


def register_head_kind(cls: type[ExitHead]) -> type[ExitHead]:
    """Class decorator: make a head kind loadable by name (bundles store only the name + options)."""
    HEAD_KINDS[cls.kind] = cls
    return cls


def check_head(kind: str, lm: LayeredModel, layer: int, **kwargs) -> type[ExitHead]:
    """The class of head kind `kind` once its options bind to its constructor; nothing is built (an
    lm_head kind copies the whole LM head), so a config can be checked before any work."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(sorted(HEAD_KINDS))}")
    try:
        inspect.signature(HEAD_KINDS[kind]).bind(lm, layer, **kwargs)
    except TypeError as err:  # an option this kind does not take (e.g. from a hand-edited bundle.json)
        raise ValueError(f"bad options for head kind {kind!r}: {kwargs} ({err})") from err
    return HEAD_KINDS[kind]


def make_head(kind: str, lm: LayeredModel, layer: int, **kwargs) -> ExitHead:
    return check_head(kind, lm, layer, **kwargs)(lm, layer, **kwargs)


def default_adapter_width(lm: LayeredModel, fraction: float = 0.005) -> int:
    """SwiGLU width giving ~`fraction` of the base model's parameters per exit (multiple of 8)."""
    total = lm.param_counts()["total"]
    return max(8, int(round(fraction * total / (3 * lm.hidden_size) / 8)) * 8)


@register_head_kind
class LinearHead(ExitHead):
    """A full hidden->hidden affine map (C*C + C params) before the frozen norm + LM head."""

    kind = "linear"

    def __init__(self, lm: LayeredModel, layer: int):
        super().__init__(lm, layer)
        C = lm.hidden_size
        self.proj = nn.Linear(C, C, bias=True, device=lm.device, dtype=torch.float32)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(C))
            self.proj.bias.zero_()

    def transform(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.proj(h.to(self.proj.weight.dtype)).to(h.dtype)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, device, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def rms(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., 1)
        return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.rms(x) * self.weight


@register_head_kind
class SwiGLUHead(ExitHead):
    """Residual SwiGLU adapter (3*C*width + C params) before the frozen norm + LM head."""

    kind = "swiglu"

    def __init__(self, lm: LayeredModel, layer: int, width: int | None = None):
        super().__init__(lm, layer)
        C = lm.hidden_size
        self.width = int(width) if width else default_adapter_width(lm)
        kw = dict(bias=False, device=lm.device, dtype=torch.float32)
        self.norm = _RMSNorm(C, lm.device)
        self.gate = nn.Linear(C, self.width, **kw)
        self.up = nn.Linear(C, self.width, **kw)
        self.down = nn.Linear(self.width, C, **kw)
        nn.init.zeros_(self.down.weight)  # untrained adapter == identity == norm_lm exactly

    def transform(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        hf = h.to(torch.float32)
        x = self.norm(hf)
        delta = self.norm.rms(hf) * self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        return h + delta.to(h.dtype)

    def extra_config(self) -> dict:
        return {"width": self.width}


@register_head_kind
class LMHeadCopy(ExitHead):
    """Option A of the issue: a tuned copy of the LM head (V*C params) over the frozen final norm."""

    kind = "lm_head"

    @classmethod
    def tunes_lm_head(cls, **options) -> bool:
        return True

    def __init__(self, lm: LayeredModel, layer: int):
        super().__init__(lm, layer)
        self.weight, self.bias = tuned_lm_head(lm)  # (V, C), (V,) or None

    def head_weight(self) -> torch.Tensor:
        return self.weight

    def head_bias(self) -> torch.Tensor | None:
        return self.bias

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., V)
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
