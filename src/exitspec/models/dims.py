"""The sizes of a decoder that every stage reads, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """Built once by the architecture adapter from the HF config; exposed by the runtime as `lm.dims`."""

    num_layers: int  # L decoder layers
    hidden_size: int  # C
    vocab_size: int  # V
    num_heads: int  # H query heads
    num_kv_heads: int  # Hkv key/value heads (H for multi-head attention)
    head_dim: int  # D
    max_positions: int  # positions the model was trained for (the KV cache's ceiling)


def dim(name: str) -> property:
    """A read-only attribute that reads `self.dims.<name>` (for classes that carry a ModelDims)."""
    return property(lambda self: getattr(self.dims, name), doc=f"ModelDims.{name}")
