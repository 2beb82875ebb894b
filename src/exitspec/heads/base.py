"""Exit heads: map the hidden state after layer l of a frozen base model to next-token logits.

Every head kind ends in the base model's own frozen final norm + LM head (or a tuned copy of the
LM head), so an untrained head is exactly the "logit lens" reading of that layer (`norm_lm`).
Heads hold references to the frozen base modules; only their own parameters are trained and saved.
"""

from __future__ import annotations

import torch
from torch import nn

from exitspec.runtime.layered import LayeredModel


class ExitHead(nn.Module):
    """Base class. `layer` = number of decoder layers run before this head (1..L-1)."""

    kind: str = ""

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

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, T, C) -> adapted hidden state fed to the (frozen) norm + LM head."""
        return h

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> final-normed features that the LM head reads."""
        return self.lm.norm(self.transform(h))

    def head_weight(self) -> torch.Tensor:
        """(V, C) LM-head weight this head uses (the frozen base one unless tuned)."""
        return self.lm.lm_head.weight

    def head_bias(self) -> torch.Tensor | None:
        return getattr(self.lm.lm_head, "bias", None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        # The base model's own LM head (prepacked where that is faster, see models/ops.Linear).
        return self.lm.head(self.normed(h))

    def extra_config(self) -> dict:
        return {}


class NormLMHead(ExitHead):
    """No parameters: the base model's final norm + LM head applied to layer l (the logit lens)."""

    kind = "norm_lm"
