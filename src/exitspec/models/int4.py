"""4-bit weights kept as the checkpoint stores them: the `weights="int4"` mode.

The embedded default model ships as a Q4_1 GGUF: every decoder projection is stored as groups of 32
4-bit integers q with an fp16 scale d and minimum m per group (w = d*q + m); only the embedding /
tied LM head is Q8_0. transformers dequantizes all of it to dense fp32 on load, so a dense fp32 step
reads 540 MB of weights that hold ~4.5 bits of information each. This module recovers (q, d, m)
*exactly* from the dense weights (every recovered group is checked to dequantize back to the very
same fp32 values, else the model is refused with a message) and runs the products from the codes.
A K-quant GGUF's blocks (Q4_K, Q5_0, Q6_K, ...) cannot be recovered this way: models/kquants.py
reads them from the file.

Two backends, chosen when the runtime is built:
  * exitspec's own kernels (kernels/csrc, built on first use; an AVX512-BF16 build and an AVX2 + FMA
    + F16C build, the best this CPU runs): the groups' fp16 scale and min are used exactly, each
    group's codes are expanded once for all rows of a call (per tile of 4 rows on AVX2), and a
    Llama-family stack runs as one fused C++ call (norms, RoPE, cache writes, attention in C++); the
    Q8_0 LM head runs from its int8 codes (`Q8Linear`). Only the products' inputs are rounded: to
    bf16 on AVX-512, to int8 per group of 32 on AVX2 (llama.cpp's Q8_0 rule, what its CPU products
    do; AVX2 has no bf16 dot product and fp32 FMAs would make a many-row step cost a multiple of a
    1-row one), and the head's to int8 per group of 32 on both (integer dot products keep it at the
    read rate; EXITSPEC_Q8_HEAD=fp32 keeps fp32 inputs on AVX-512); everything else is fp32.
  * torch's int4 CPU kernel (`aten._weight_int4pack_mm_for_cpu`) where those cannot run: it takes
    bf16 inputs and bf16 per-group scale/zero (d and m + 8d rounded to bf16, a relative change
    <= 2^-9 per group) and dequantizes again for every block of 4 rows; the LM head is a prepacked
    bf16 copy (models/ops.Linear).
All are row-invariant (a row's output is bit-identical in 1-row and k-row calls, tests/test_int4.py
and tests/test_kernels.py), which lossless speculative decoding needs. How close the output stays
to the fp32 reference is measured, not assumed: `exitspec bench-runtime --weights int4` reports
where greedy text first departs and, teacher-forced on the dense model's own text, the top-1
agreement, KL and perplexity. The AVX2 build's int8 inputs move the distributions more than torch's
bf16 inputs do, yet neither changes the dense model's perplexity of the text noticeably; simulated
on the fp32 model, the int8 inputs' error is spread over all products, not one (figures:
benchmarks/README.md, 'Design measurements').

Speed: the default model's products over 30 layers read 66 MB of codes and scales. exitspec's q4
kernel takes about half the time of torch's int4 kernel up to 4 rows and grows far less at 8. A
1-row product streams the codes at about the machine's DRAM bandwidth, thanks to software prefetch;
past 4 rows it is bound by vdpbf16ps throughput (one per cycle on Zen 5), which is why an 8-row
decode step costs clearly more than a 1-row one while 2-4 rows cost about the same (`exitspec info
--weights int4`). A whole decode step on torch's kernel with per-op torch glue costs several times a
fused one; on an AVX2 machine the AVX2 build cut the step to a fraction of torch's. There one core's
q4 product reaches its peak rate at 4+ rows, set by vpmaddubsw throughput (two per cycle, no VNNI,
with the unpacking and per-group scaling around them), so from 4 rows on a step grows with every
row (up to 4 rows the growth is in the attention halves, runtime/profile.py). Figures by machine:
benchmarks/README.md, 'Design measurements' and 'Run history'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exitspec import kernels

GROUP = 32  # weights per quantization group along the input dimension (GGUF Q4_0 / Q4_1 blocks)
_Q8_ROWS = 4096  # rows of a weight recover_q8 checks at a time
BLOCK = 16  # the kernels take output sizes that are multiples of this


def fp16_exact(t: torch.Tensor) -> bool:
    """True if every value survives a round trip through fp16 (GGUF stores scales as fp16)."""
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


@dataclass
class Int4Groups:
    """A (out, in) weight as 4-bit groups: w[o, g*G + j] = scale[o, g] * q[o, g*G + j] + low[o, g]."""

    q: torch.Tensor  # (out, in) uint8 in 0..15
    scale: torch.Tensor  # (out, in / G) fp32
    low: torch.Tensor  # (out, in / G) fp32

    @staticmethod
    def cat(parts: list[Int4Groups]) -> Int4Groups:
        """Stack along the output dimension (fused q|k|v, gate|up): groups run along the input."""
        return Int4Groups(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.low for p in parts]))


def recover_groups(weight: torch.Tensor, group: int = GROUP) -> Int4Groups | None:
    """(q, scale, low) such that scale*q + low reproduces `weight` bit for bit in fp32, or None.

    GGUF Q4_1 quantizes each block with low = min and scale = (max - min) / 15, so the block's
    smallest weight has q = 0 and its largest q = 15: both are read back from the dense values.
    Q4_0 (symmetric, w = d * (q - 8)) is the special case low = -8d.
    """
    w = weight.detach().to(torch.float32)
    out, n_in = w.shape
    if n_in % group:
        return None
    b = w.reshape(out, n_in // group, group)  # (out, groups, G)
    low = b.amin(-1)
    scale = (b.amax(-1) - low) / 15
    q = torch.round((b - low[..., None]) / torch.where(scale == 0, 1.0, scale)[..., None]).clamp_(0, 15)
    if not torch.equal(q * scale[..., None] + low[..., None], b):
        return None
    return Int4Groups(q.to(torch.uint8).reshape(out, n_in), scale, low)


def recover_q8(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8, scale) with scale * q == weight bit for bit in fp32 and fp16-exact scales (a GGUF Q8_0
    tensor de-quantized by transformers), or None.

    Q8_0 sets scale = max|w| / 127 per group, so the group's largest magnitude has |q| = 127.
    Checked in chunks of rows, each with the first candidate scale that reproduces it: a tied
    embedding of 262k rows (Gemma 3) is 671 MB, and whole-tensor temporaries took ~9 s and 2 GB."""
    w = weight.detach()
    out, n_in = w.shape
    if n_in % group:
        return None
    q = torch.empty(out, n_in, dtype=torch.int8)
    scales = torch.empty(out, n_in // group)
    for r0 in range(0, out, _Q8_ROWS):
        b = w[r0: r0 + _Q8_ROWS].to(torch.float32).reshape(-1, n_in // group, group)
        amax = b.abs().amax(-1)
        for scale in (amax / 127, (amax / 127).half().float()):
            qc = q8_codes(b, scale)
            if fp16_exact(scale) and torch.equal(qc * scale[..., None], b):
                q[r0: r0 + _Q8_ROWS] = qc.reshape(-1, n_in)
                scales[r0: r0 + _Q8_ROWS] = scale
                break
        else:
            return None
    return q, scales


def q8_codes(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q8_0 codes of fp32 `groups` (..., n, 32) at `scale` (..., n): round(w / scale) in -127..127 (as
    floats; a zero scale, an all-zero group, gives zero codes)."""
    return torch.round(groups / torch.where(scale == 0, 1.0, scale)[..., None]).clamp_(-127, 127)


def int4_table(model: nn.Module, group: int = GROUP) -> dict[nn.Linear, Int4Groups]:
    """Recover the 4-bit groups of every nn.Linear inside the decoder layers (never the LM head).

    Raises a ValueError naming the first projection whose weights are not 4-bit groups (a model
    not loaded from a Q4_0 / Q4_1 checkpoint), since silently keeping it dense would hide why the
    int4 mode is slow.
    """
    head = model.get_output_embeddings()
    table: dict[nn.Linear, Int4Groups] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is head:
            continue
        groups = recover_groups(mod.weight, group)
        if groups is None:
            raise ValueError(
                f"weights='int4' keeps a checkpoint's own 4-bit weights, but {name} is not stored as 4-bit "
                f"groups of {group} (load a Q4_0/Q4_1 GGUF such as the default model, or use weights='dense')"
            )
        table[mod] = groups
    if not table:
        raise ValueError("weights='int4' found no nn.Linear projections in this model (GPT-2 uses Conv1D); "
                         "use weights='dense'")
    return table


class Int4Linear:
    """y = x @ W.T + b with W held as packed 4-bit groups; x is (..., in), y in x's dtype.

    Runs exitspec's own kernel (kernels/csrc/gemm_avx512.cpp or gemm_avx2.cpp: exact fp16 scales,
    the groups expanded once per call or tile of rows) where it is available, else torch's int4 kernel (bf16
    scales and products)."""

    __slots__ = ("packed", "scale_zero", "bias", "group", "out_features", "kernel", "_ops")

    def __init__(self, groups: Int4Groups, bias: torch.Tensor | None = None, group: int = GROUP):
        out, n_in = groups.q.shape
        self.group = group
        self.out_features = out
        self.bias = bias
        self.kernel = self._ops = None
        self.packed = self.scale_zero = None
        ops = kernels.load()
        if ops is not None and group == GROUP and out % BLOCK == 0 and fp16_exact(groups.scale) \
                and fp16_exact(groups.low):
            self._ops = ops
            b = None if bias is None else bias.detach().to(torch.float32).contiguous()
            self.kernel = ops.Q4Weight(groups.q.contiguous(), groups.scale.contiguous(), groups.low.contiguous(), b)
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q.to(torch.int32), 1)
        # The kernel dequantizes as (q - 8) * scale + zero, so zero = low + 8 * scale.  (groups, out, 2)
        self.scale_zero = torch.stack([groups.scale, groups.low + 8 * groups.scale], -1).transpose(0, 1)
        self.scale_zero = self.scale_zero.contiguous().to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales a call reads, as packed for the kernel that runs."""
        if self.kernel is not None:
            return self.kernel.nbytes
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2

    def __call__(self, x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:  # (..., in) -> (..., out)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        # min_rows is not needed: both kernels are row-invariant already (see the module docstring).
        if self.kernel is not None:
            return self._ops.q4_linear(x2.to(torch.float32).contiguous(), self.kernel).to(x.dtype).view(
                *lead, self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group,
                                                       self.scale_zero).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


class Q8Linear:
    """The int4 mode's LM head where the checkpoint stores it as GGUF Q8_0 (the default model's tied
    embedding): int8 codes with one fp16 scale per 32 inputs, multiplied by exitspec's kernel (inputs
    quantized to int8 per group of 32 on both builds, the same logits on each; fp32 inputs on AVX-512
    with EXITSPEC_Q8_HEAD=fp32; exact weights; half the bytes of a bf16 copy, a quarter of fp32).
    Build with `from_weight`."""

    __slots__ = ("kernel", "bias", "out_features", "_ops")

    def __init__(self, kernel, bias: torch.Tensor | None, ops):
        self.kernel, self.out_features, self.bias, self._ops = kernel, kernel.out_features, bias, ops

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Q8Linear | None:
        """None where the kernels are unavailable or `weight` is not Q8_0 groups bit for bit."""
        ops = cls._ops_for(weight)
        found = None if ops is None else recover_q8(weight)
        if found is None:
            return None
        q, scale = found
        return cls(ops.Q8Weight(q.contiguous(), scale.contiguous()), bias, ops)

    @classmethod
    def quantized(cls, weight: torch.Tensor) -> Q8Linear | None:
        """`weight` (out, in) rounded to Q8_0 (per group of 32 inputs: scale = max|w| / 127 in fp16, codes
        round(w / scale)), for products whose exact fp32 weights are not needed (a draft head's);
        None where the kernels are unavailable or the shape is not whole tiles and groups."""
        ops = cls._ops_for(weight)
        if ops is None:
            return None
        out, n_in = weight.shape
        b = weight.detach().to(torch.float32).reshape(out, n_in // GROUP, GROUP)
        scale = (b.abs().amax(-1) / 127).half().float()  # (out, in / 32), fp16-exact as Q8_0 stores it
        q = q8_codes(b, scale).to(torch.int8).reshape(out, n_in)
        return cls(ops.Q8Weight(q.contiguous(), scale.contiguous()), None, ops)

    @staticmethod
    def _ops_for(weight: torch.Tensor):
        """The kernels' module where they can multiply `weight` (out, in): loaded, on the CPU, whole
        16-row tiles and 32-input groups; else None."""
        ops = kernels.load()
        if ops is None or weight.device.type != "cpu" or weight.shape[0] % BLOCK or weight.shape[1] % GROUP:
            return None
        return ops

    @property
    def nbytes(self) -> int:
        """Bytes of int8 codes and scales a call reads."""
        return self.kernel.nbytes

    def __call__(self, x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:  # (..., in) -> (..., out)
        lead = x.shape[:-1]
        y = self._ops.q8_linear(x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous(), self.kernel)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*lead, self.out_features)
