"""The few tensor operations every architecture adapter shares.

Kept in one place so that the choice of matmul layout (the dominant cost of a decode step on CPU)
is made once, with its reason next to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for an nn.Linear-layout weight (out, in).

    Measured on the 2-core AVX2 CPU with torch 2.13/MKL (SmolLM2 shapes, weights streamed from DRAM
    as in a real decode step): `F.linear` is as fast as any re-layout for 1-8 rows once the weights
    do not fit in cache, and it is what HF uses, which keeps our logits bit-identical to HF's
    forward. See `exitspec info --profile` and `exitspec bench-step` for the per-k step costs.
    """
    return F.linear(x, weight, bias)


def attention(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, Hkv, L, D) — a view of the cache up to the longest attended position
    v: torch.Tensor,  # (B, Hkv, L, D)
    mask: torch.Tensor | None,  # (B, 1, T, L) bool, True = may attend; None = attend to all L
    scale: float,
) -> torch.Tensor:  # (B, H, T, D)
    """Scaled dot-product attention over a position-indexed KV cache, grouped-query aware."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        # enable_gqa broadcasts KV heads without materialising copies.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
