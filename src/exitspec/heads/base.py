"""Exit heads: map the hidden state after layer l of a frozen base model to next-token logits.

Every head kind ends in the base model's own frozen final norm + LM head (or a tuned copy of the
LM head), so an untrained head is exactly the "logit lens" reading of that layer (`norm_lm`).
Heads hold references to the frozen base modules; only their own parameters are trained and saved.

Most kinds read one position at a time. A *contextual* head (heads/block.py: a decoder layer of its
own) attends over the exit's hidden states of earlier positions too: its `transform` then takes a
whole sequence from position 0, and while decoding `transform_at` reads new positions against the
head's own keys / values kept in the decode cache.
"""

from __future__ import annotations

import torch
from torch import nn

from exitspec.runtime.layered import LayeredModel


class ExitHead(nn.Module):
    """Base class. `layer` = number of decoder layers run before this head (1..L-1)."""

    kind: str = ""
    contextual: bool = False  # attends over earlier positions (see the module docstring)

    def __init__(self, lm: LayeredModel, layer: int):
        super().__init__()
        if not 0 < layer < lm.num_layers:
            raise ValueError(f"exit layer {layer} must be in 1..{lm.num_layers - 1}")
        self.layer = layer
        # Kept out of the module tree (a plain attribute on a tuple) so the frozen base is neither
        # saved with the head nor handed to an optimizer.
        self._base = (lm,)

    @property
    def lm(self) -> LayeredModel:
        return self._base[0]

    @classmethod
    def tunes_lm_head(cls, **options) -> bool:
        """Whether heads of this kind with these options train their own copy of the LM head."""
        return False

    @property
    def layers_run(self) -> int:
        """Decoder layers a token passes through to reach this exit's logits (its cost in layers)."""
        return self.layer

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, T, C) -> adapted hidden state fed to the (frozen) norm + LM head."""
        return h

    def transform_at(self, h: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """`transform` of new positions (B, T) while decoding; a contextual head attends over the
        earlier ones through `cache` (runtime/kv_cache.KVCache with a head_cache)."""
        return self.transform(h)

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> final-normed features that the LM head reads."""
        return self.lm.norm(self.transform(h))

    def normed_at(self, h: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        return self.lm.norm(self.transform_at(h, positions, cache))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed features (..., C) -> logits (..., V) through this head's LM head."""
        # The base model's own LM head (prepacked where that is faster, see models/ops.Linear).
        return self.lm.head(x)

    def rows(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """Logits (N, V) at `rows` of ONE sequence's hidden states h (T, C) from position 0: a
        contextual head reads the whole sequence, the others only the rows."""
        if self.contextual:
            return self(h[None])[0, rows]
        return self(h[rows][None])[0]

    def head_weight(self) -> torch.Tensor:
        """(V, C) LM-head weight this head uses (the frozen base one unless tuned)."""
        return self.lm.lm_head.weight

    def head_bias(self) -> torch.Tensor | None:
        return getattr(self.lm.lm_head, "bias", None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        return self.project(self.normed(h))

    def extra_config(self) -> dict:
        return {}


class NormLMHead(ExitHead):
    """No parameters: the base model's final norm + LM head applied to layer l (the logit lens)."""

    kind = "norm_lm"


def tuned_lm_head(lm: LayeredModel) -> tuple[nn.Parameter, nn.Parameter | None]:
    """A trainable fp32 copy of the base's LM head: weight (V, C) and bias (V,) or None."""
    base = lm.lm_head
    weight = nn.Parameter(base.weight.detach().to(torch.float32).clone())
    b = getattr(base, "bias", None)
    return weight, (nn.Parameter(b.detach().to(torch.float32).clone()) if b is not None else None)
