"""The packed weight layouts the C++ kernels read (csrc/gemm.cpp describes them byte by byte)."""

from __future__ import annotations

import torch

GROUP = 32  # inputs per quantization group
BLOCK = 16  # outputs per packed block


def fp16_exact(t: torch.Tensor) -> bool:
    """True if every value survives a round trip through fp16 (GGUF stores scales as fp16)."""
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


def pack_q4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 with (N, K/32) fp16-exact scale and low (w = scale * q + low) -> uint8 buffer.

    Per block of 16 outputs and group of 32 inputs: 8 quads of 32 bytes (byte 2j holds q[j, k0] and
    q[j, k2], byte 2j+1 holds q[j, k1] and q[j, k3], low nibble first), then the 16 scales and the 16
    lows as fp16."""
    N, K = q.shape
    if N % BLOCK or K % GROUP:
        raise ValueError(f"q4 packing needs out % {BLOCK} == 0 and in % {GROUP} == 0, got {N} x {K}")
    G = K // GROUP
    c = q.to(torch.uint8).reshape(N // BLOCK, BLOCK, G, 8, 4).permute(0, 2, 3, 1, 4)  # (nb, g, quad, j, 4)
    nibbles = torch.stack([c[..., 0] | (c[..., 2] << 4), c[..., 1] | (c[..., 3] << 4)], -1)  # (nb, g, quad, j, 2)
    return torch.cat([nibbles.reshape(N // BLOCK, G, 256), _per_block_fp16(scale), _per_block_fp16(low)],
                     -1).contiguous().view(-1)


def pack_q8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes with (N, K/32) fp16-exact scales (w = scale * q, GGUF Q8_0) -> uint8 buffer:
    per block and group, 32 inputs x 16 bytes (one per output), then the 16 scales as fp16."""
    N, K = q.shape
    if N % BLOCK or K % GROUP:
        raise ValueError(f"q8 packing needs out % {BLOCK} == 0 and in % {GROUP} == 0, got {N} x {K}")
    G = K // GROUP
    c = q.to(torch.int8).view(torch.uint8).reshape(N // BLOCK, BLOCK, G, GROUP).permute(0, 2, 3, 1)  # (nb, g, k, j)
    return torch.cat([c.reshape(N // BLOCK, G, 512), _per_block_fp16(scale)], -1).contiguous().view(-1)


def _per_block_fp16(v: torch.Tensor) -> torch.Tensor:  # (N, G) -> (N/16, G, 32) bytes of 16 fp16 values
    N, G = v.shape
    return v.to(torch.float16).reshape(N // BLOCK, BLOCK, G).permute(0, 2, 1).contiguous().view(torch.uint8)


def recover_q8(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8, scale) with scale * q == weight bit for bit in fp32 and fp16-exact scales (a GGUF Q8_0
    tensor de-quantized by transformers), or None.

    Q8_0 sets scale = max|w| / 127 per group, so the group's largest magnitude has |q| = 127."""
    w = weight.detach().to(torch.float32)
    out, n_in = w.shape
    if n_in % group:
        return None
    b = w.reshape(out, n_in // group, group)
    amax = b.abs().amax(-1)
    for scale in (amax / 127, (amax / 127).half().float()):
        q = torch.round(b / torch.where(scale == 0, 1.0, scale)[..., None]).clamp_(-127, 127)
        if fp16_exact(scale) and torch.equal(q * scale[..., None], b):
            return q.to(torch.int8).reshape(out, n_in), scale
    return None
