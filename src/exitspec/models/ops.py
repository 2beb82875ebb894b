"""The few tensor operations every architecture adapter shares.

Kept in one place so that the choice of matmul layout (the dominant cost of a decode step on CPU)
is made once, with its reason next to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
    if n == 1:  # every decode step of vanilla decoding: one copy, no cat (a much cheaper call; benchmarks/README.md)
        shape = list(x.shape)
        shape[dim] = to
        return x.expand(shape).contiguous()
    last = x.narrow(dim, n - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = to - n
    return torch.cat([x, last.repeat(reps)], dim)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, min_rows: int = 1) -> torch.Tensor:
    """y = x @ weight.T + bias for an nn.Linear-layout weight (out, in); x is (..., in).

    Row-count invariance (what lossless speculative decoding needs): a row must get bit-identical
    results whether it is computed alone (vanilla decoding) or among the k rows of a verification
    call. MKL's sgemm is not like that (torch 2.13, 2 threads): 1 row takes a gemv path and, for
    small output sizes (192, 576, 960 = fused qkv), 2-3 rows take yet another kernel; each differs
    from the 4-15-row kernel by ~1e-6 per matmul, ~5e-5 in the default model's logits after 30
    layers (`exitspec.runtime.profile.row_invariance`). Rows 4..15 agree bit for bit for every
    SmolLM2 shape (16+ rows switch kernels again). So calls with 1-3 rows are padded to 4 by
    repeating the last row and the extra results dropped when `min_rows=MIN_ROWS` (row-invariant
    mode, `LayeredModel(model, row_invariant=True)`). It is NOT the default, because MKL's few-row
    gemm is slow: a padded 1-row call costs what a 4-row call does, far more than the gemv path, in
    HF's layout and with a pre-transposed copy alike (benchmarks/README.md, 'Design measurements').
    Unpadded, the 1-row vs 8-row logit difference of the default model is <= 7e-5 (0 argmax flips
    in 48 rows); padded (row-invariant mode) it is exactly 0 (tests/test_speed_paths.py).

    Layout: HF's (out, in) weight with `F.linear` (MKL trans-B) stays for fp32: the pre-transposed
    copy wins at k=1 only at one thread, and only slightly, and costs 425 MB for the default model.
    bf16/fp16 weights go through `Linear`'s prepacked oneDNN path instead (see there).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    n = x2.shape[0]
    y = F.linear(_pad_rows(x2, 0, min_rows), weight, bias)[:n] if n < min_rows else F.linear(x2, weight, bias)
    return y.view(*lead, y.shape[-1])


@contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Context for tensors a runtime builds once and keeps (packed weights, RoPE tables, fused
    projections): made here they are normal tensors whether the first call came from inside
    `torch.inference_mode()` (a decode loop) or not. An inference tensor kept past its loop breaks
    later users outside inference mode: autograd refuses to save it for backward and it has no
    version counter."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def in_place_version(t: torch.Tensor) -> int:
    """t's in-place version counter; -2 for an inference tensor, which has none (and can be changed
    in place only inside inference mode, which exitspec never does to a weight)."""
    return -2 if t.is_inference() else t._version


def onednn_packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """True where a bf16/fp16 weight can be prepacked for oneDNN (CPU builds with mkldnn and a
    CPU that has the matching instructions: AVX512-BF16/AMX for bf16, AVX512-FP16/AMX-FP16 for fp16)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


class Linear:
    """One projection y = x @ W.T + b of a frozen model, run the fastest sound way for its dtype.

    Why prepacking: for a bf16 weight, `F.linear` hands oneDNN the plain (out, in) matrix and oneDNN
    reorders it into its blocked AMX layout on EVERY call; on a decode step (1-8 rows) that reorder
    costs more than the product. `torch.ops.mkldnn._reorder_linear_weight` does the reorder once
    (what inductor's freezing pass does), and `_linear_pointwise` then reads the packed copy, faster
    than bf16 `F.linear` for every projection shape measured (qkv, gate|up, LM head). In bf16 a k-row
    call then costs about what a 1-row call does, the property that speculative verification needs,
    where an fp32 MKL call grows severalfold from 1 to 8 rows (measured on a Xeon with AMX:
    benchmarks/README.md, 'Design measurements'). fp32 keeps MKL's sgemm: MKL's packed sgemm
    (`torch.ops.mkl._mkl_linear`) was not faster there and oneDNN fp32 matched F.linear.

    The packed copy is extra memory (one more copy of the bf16 weights) and is made lazily on the
    first call under no-grad (autograd goes through plain `F.linear`), and again if the weight was
    changed in place since (tracked by the tensor's version counter). It is always made outside
    inference mode, so a first call inside `torch.inference_mode()` (every decode loop) leaves a
    normal tensor that later calls outside it (training, evaluation) can use; a weight that is itself
    an inference tensor has no version counter and is packed once.
    """

    __slots__ = ("weight", "bias", "_pack", "_packed", "_version")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight  # (out, in)
        self.bias = bias  # (out,) or None
        self._pack = onednn_packing_available(weight.dtype, weight.device)
        self._packed: torch.Tensor | None = None
        self._version = -1

    def packed(self) -> torch.Tensor:
        w = self.weight
        version = in_place_version(w)
        if self._packed is None or self._version != version:
            with outside_inference_mode():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self._version = version
        return self._packed

    @property
    def nbytes(self) -> int:
        """Bytes of weights a call reads (the packed copy is the same size)."""
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:  # (..., in) -> (..., out)
        """Output in x's dtype: an fp32 x meets a bf16 weight (int4 mode's LM head) as bf16."""
        if x.dtype != self.weight.dtype:
            return self(x.to(self.weight.dtype), min_rows).to(x.dtype)
        if not self._pack or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return linear(x, self.weight, self.bias, min_rows)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        # No padding needed for row invariance here: a row's output is bit-identical across 1..40-row
        # calls with the packed kernel (tests/test_int4.py).
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed(), self.bias, "none", [], "")
        return y.view(*lead, y.shape[-1])


def fused_bias(mods: list[nn.Linear]) -> torch.Tensor | None:
    """The biases of Linear layers sharing an input, concatenated (zeros for those without), or None."""
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])


def fuse_linears(mods: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate Linear layers sharing an input into one (sum(out), in) weight, in place.

    The modules' parameters are re-pointed at row slices of the fused buffer, so no memory is
    duplicated and HF's own forward keeps working unchanged: each parameter is a contiguous view
    holding exactly the values it held before (bit-identical HF outputs; tests/test_speed_paths.py
    checks it). One fused matmul instead of 2-3 saves per-op dispatch and lets MKL split one large
    problem over both cores instead of several small ones. Returns (weight, bias or None).
    """
    w = torch.cat([m.weight.detach() for m in mods])
    b = fused_bias(mods)
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
