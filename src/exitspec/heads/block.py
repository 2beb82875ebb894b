"""An exit head that is one decoder layer of the base architecture, then the final norm + LM head.

Two research ideas are this one module, differing only in how the layer starts:
- init "new" (Kangaroo's adapter): a layer added after exit l, a copy of the base's layer l with the
  projections that write into the residual stream zeroed, so that, untrained, it is the identity and
  the head is exactly the `norm_lm` logit lens of layer l.
- init "copy" (the research plan's Option B, `exitspec train --ft-last-block`): the base's layer l
  itself, tuned: untrained, the head is the logit lens of layer l + 1, and training adapts that last
  kept layer (with `tune_head`, the LM head too) to be read early. Its cost is l + 1 layers.
Either way the head is a standard layer, so export writes it as layer l of a draft model
(export/draft.py) that any engine runs.

Unlike the position-wise kinds, the layer attends over earlier positions. Training and evaluation
pass whole sequences from position 0 (`transform`). Decoding (`transform_at`) keeps the layer's own
keys / values in the decode cache's `head_cache`, fed from the hidden states the cache keeps at the
exit (`hidden_layer`): before a draft the layer first catches up on positions it has not seen (the
prompt, or a draft the verifier accepted after the head's last call), reading their kept states.
The layer runs through the architecture adapter's `block` (models/adapters.py): HF's own modules,
the same glue as the base's layers, with the model's RoPE tables and masks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from exitspec.heads.base import ExitHead, tuned_lm_head
from exitspec.runtime.kv_cache import KVCache
from exitspec.runtime.layered import LayeredModel

INITS = ("new", "copy")


class BlockHead(ExitHead):
    """A decoder layer (its parameters trainable, fp32) between exit `layer` and the norm + LM head."""

    kind = "block"
    contextual = True

    def __init__(self, lm: LayeredModel, layer: int, init: str = "new", tune_head: bool = False):
        super().__init__(lm, layer)
        if init not in INITS:
            raise ValueError(f"block head init must be one of {INITS}, got {init!r}")
        self.init, self.tune_head = init, bool(tune_head)
        self.block = _trainable_copy(lm.adapter.layers[layer])
        if init == "new":  # zero what the layer adds to the residual stream: the identity at start
            with torch.no_grad():
                for name in lm.adapter.residual_outputs:
                    for p in self.block.get_submodule(name).parameters():
                        p.zero_()
        self.weight, self.bias = tuned_lm_head(lm) if self.tune_head else (None, None)

    @classmethod
    def tunes_lm_head(cls, init: str = "new", tune_head: bool = False) -> bool:
        return bool(tune_head)

    @property
    def layers_run(self) -> int:
        return self.layer + 1

    def head_weight(self) -> torch.Tensor:
        return self.weight if self.tune_head else super().head_weight()

    def head_bias(self) -> torch.Tensor | None:
        return self.bias if self.tune_head else super().head_bias()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tune_head:
            return super().project(x)
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def extra_config(self) -> dict:
        return {"init": self.init, "tune_head": self.tune_head}

    # --- the layer ---------------------------------------------------------------------------------
    def _run(self, h: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """The layer over h (B, T, C) at `positions` (B, T), writing / attending kv's one layer."""
        ctx = self.lm.masked_context(h, positions)
        dtype = next(self.block.parameters()).dtype
        if ctx.rope is not None:  # the model's tables, in the layer's (fp32) dtype
            ctx.rope = tuple(t.to(dtype) for t in ctx.rope)
        return self.lm.adapter.block(self.block, h.to(dtype), kv.layer(0), ctx).to(h.dtype)

    def transform(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) from position 0 -> (B, T, C)
        B, T, _ = h.shape
        d = self.lm.dims
        kv = KVCache(1, B, d.num_kv_heads, d.head_dim, T, dtype=torch.float32, device=h.device)
        return self._run(h, torch.arange(T, device=h.device).expand(B, T), kv)

    def transform_at(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        kv = cache.head_cache
        if kv is None or cache.hidden_layer != self.layer:
            raise RuntimeError(f"a block head decodes with a cache from lm.new_cache(..., hidden_layer={self.layer}, "
                               "head_cache=torch.float32): it reads the states kept at its exit")
        start = positions[:, 0].cpu()  # (B,) each row's first new position
        filled = kv.lengths[0]  # (B,) positions the layer holds keys / values for
        if bool((filled < start).any()):
            # Catch up on positions 0.. the layer has not seen, from the kept exit states. Rows that
            # need less rewrite a few positions with the same values, or write slots past their own
            # start that this call overwrites before anything attends to them (kv_cache.py).
            lo, hi = int(filled.min()), int(start.max())
            pos = torch.arange(lo, hi, device=h.device).expand(h.shape[0], hi - lo)  # (B, hi - lo)
            rows = torch.arange(h.shape[0], device=h.device)[:, None]
            self._run(cache.hidden[rows, pos], pos, kv)
        end = positions[:, -1] + 1
        kv.check_room(end)
        out = self._run(h, positions, kv)
        kv.mark_filled(0, 1, end)
        return out


def _trainable_copy(layer: nn.Module) -> nn.Module:
    """A copy of a base decoder layer with its own fp32 parameters (the base's may be views of a fused
    tensor, bf16, or frozen)."""
    block = copy.deepcopy(layer)
    for mod in block.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(p.detach().to(torch.float32).clone())
    return block
