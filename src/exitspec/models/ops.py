"""The few tensor operations every architecture adapter shares.

Kept in one place so that the choice of matmul layout (the dominant cost of a decode step on CPU)
is made once, with its reason next to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# In row-invariant mode, calls with fewer rows than this are padded up to it (`linear`, `attention`).
MIN_ROWS = 4


def _pad_rows(x: torch.Tensor, dim: int, to: int) -> torch.Tensor:
    """Repeat the last entry along `dim` until it has `to` entries (results of the copies are dropped)."""
    n = x.shape[dim]
    if n >= to:
        return x
    last = x.narrow(dim, n - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = to - n
    return torch.cat([x, last.repeat(reps)], dim)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, min_rows: int = 1) -> torch.Tensor:
    """y = x @ weight.T + bias for an nn.Linear-layout weight (out, in); x is (..., in).

    Row-count invariance (what lossless speculative decoding needs): a row must get bit-identical
    results whether it is computed alone (vanilla decoding) or among the k rows of a verification
    call. MKL's sgemm is not like that: measured on this CPU (torch 2.13, 2 threads), 1 row takes a
    gemv path and, for small output sizes (192, 576, 960 = fused qkv), 2-3 rows take yet another
    kernel; each differs from the 4-15-row kernel by ~1e-6 per matmul, ~5e-5 in the default model's
    logits after 30 layers (`exitspec.runtime.profile.row_invariance`). Rows 4..15 agree bit for bit
    for every SmolLM2 shape (16+ rows switch kernels again). So calls with 1-3 rows are padded to 4
    by repeating the last row and the extra results dropped when `min_rows=MIN_ROWS` (row-invariant
    mode, `LayeredModel(model, row_invariant=True)`). It is NOT the default, because MKL's few-row
    gemm is slow here: full step, default model, 256 cached tokens, 1 thread (min of 6, in one run):
        F.linear           k=1 58 ms, k=2 62, k=4 96, k=8 127
        F.linear padded    k=1 104 ms (= its k=4 cost), k=4 98, k=8 131
        x @ W_t (copy)     k=1 53 ms, k=2 74, k=4 84, k=8 109  (pre-transposed, +425 MB)
        x @ W_t padded     k=1 85 ms, k=4 82, k=8 101
    2 threads, same run order (base = foundation code, now = fused projections, this default):
        base k=1 35.2 ms, k=2 35.9, k=4 52.7, k=8 66.1;  now k=1 31.5, k=2 32.9, k=4 51.4, k=8 65.4
    Unpadded, the 1-row vs 8-row logit difference of the default model is <= 7e-5 (0 argmax flips
    in 48 rows); padded (row-invariant mode) it is exactly 0 (tests/test_speed_paths.py).

    Layout: HF's (out, in) weight with `F.linear` (MKL trans-B) stays: the pre-transposed copy wins
    at k=1 by ~10% only at one thread and costs 425 MB for the default model.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    n = x2.shape[0]
    y = F.linear(_pad_rows(x2, 0, min_rows), weight, bias)[:n] if n < min_rows else F.linear(x2, weight, bias)
    return y.view(*lead, y.shape[-1])


def fuse_linears(mods: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate Linear layers sharing an input into one (sum(out), in) weight, in place.

    The modules' parameters are re-pointed at row slices of the fused buffer, so no memory is
    duplicated and HF's own forward keeps working unchanged: each parameter is a contiguous view
    holding exactly the values it held before (bit-identical HF outputs; tests/test_speed_paths.py
    checks it). One fused matmul instead of 2-3 saves per-op dispatch and lets MKL split one large
    problem over both cores instead of several small ones. Returns (weight, bias or None).
    """
    w = torch.cat([m.weight.detach() for m in mods])
    b = None
    if all(m.bias is not None for m in mods):
        b = torch.cat([m.bias.detach() for m in mods])
    elif any(m.bias is not None for m in mods):
        b = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                       for m in mods])
    row = 0
    for m in mods:
        n = m.out_features
        m.weight.data = w[row:row + n]
        if m.bias is not None and b is not None:
            m.bias.data = b[row:row + n]
        row += n
    return w, b


def attention(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, Hkv, L, D) — a view of the cache up to the longest attended position
    v: torch.Tensor,  # (B, Hkv, L, D)
    mask: torch.Tensor | None,  # (B, 1, T, L) bool, True = may attend; None = attend to all L
    scale: float,
    min_rows: int = 1,
) -> torch.Tensor:  # (B, H, T, D)
    """Scaled dot-product attention over a position-indexed KV cache, grouped-query aware.

    Like `linear`, SDPA's CPU kernel gives a query row different low bits when the call has 1-2
    query rows than when it has 4+ (measured ~3e-7 per layer), so fewer than MIN_ROWS queries are
    padded with copies of the last query (and of its mask row) when `min_rows=MIN_ROWS`.
    """
    T = q.shape[2]
    if min_rows > T:
        q = _pad_rows(q, 2, min_rows)
        if mask is not None:
            mask = _pad_rows(mask, 2, min_rows)
    # enable_gqa broadcasts KV heads without materialising copies.
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[:, :, :T] if min_rows > T else o
