"""weights="int4" on a K-quant GGUF: decoder projections run from the blocks the file stores.

A llama.cpp "K-quant" file (Q4_K_M, the most common kind) stores a model's projections in several block
types, chosen per tensor: Gemma 3 270M's keeps o_proj (and half the down_proj) in Q4_K, q/k/gate/up
in Q5_0 (640 inputs are not whole 256-value super-blocks), v_proj in Q5_0 or Q8_0, the other
down_proj in Q6_K. Unlike Q4_0 / Q4_1 groups (models/int4.py), these cannot be recovered from the
de-quantised weights transformers loads, so they are read from the file itself (models/gguf_tensors.py)
and matched to the HF model's projections by llama.cpp's tensor names (blk.N.attn_q <-> layers.N.
self_attn.q_proj, ...). Every tensor is then checked: its blocks, decoded by the same C++ decoder the
kernels are packed from (kernels/csrc/ggml_blocks.h), must reproduce the model's fp32 weights bit for
bit; a tensor that does not (another file, a permuted layout) refuses the mode with its name.

The products run on exitspec's K-quant kernels (kernels/csrc/kquant_avx512.cpp, kquant_avx2.cpp): the
codes stay packed as compactly as the file keeps them (4.6, 5.5, 6.6 and 8.5 bits a weight), each
block's exact scale multiplies its group's dot products, and the inputs are rounded as the q4
product's are (bf16 on AVX-512, int8 per group of 32 on AVX2), so a Gemma layer rounds every
projection's input the same way whatever its block type. Row-invariant as every exitspec kernel.
Block types read: Q4_K, Q5_0, Q6_K, Q8_0 and Q4_0 (packed as Q5_0); where the kernels cannot run,
or a projection is stored otherwise, the mode is refused with the reason (never a silent slow path).

Families: Gemma 3 and the Llama family (llama, qwen2, mistral). llama.cpp stores a Llama file's q and k
rows permuted (its RoPE pairs dimension i with i + 1, HF's with i + D/2) and transformers permutes
them back as it loads (its LlamaTensorProcessor, for GGUF architecture "llama"); a block holds part of
one row, so the same permutation of the stored rows gives the blocks in HF's order, and the bit-for-bit
check holds for them as for any other tensor. A Llama stack of K-quant blocks runs per projection: the
fused C++ stack (kernels/csrc/llama.cpp) takes Q4_0 / Q4_1 groups only.

The LM head: a Q8_0 head (Gemma 3 270M's tied embedding, the default model's) runs on the q8 kernel
from the codes recovered from its dense weights (models/int4.Q8Linear); a head the file stores in
another block type the kernels read (llama.cpp's Q4_K_M writes Q6_K heads where the hidden size is
whole 256-value super-blocks) is read from the file and checked like a projection (`kquant_table` puts
it in the table under the head module), so it runs on the K-quant kernel rather than as a bf16 copy.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exitspec import kernels
from exitspec.models.gguf_file import read_summary
from exitspec.models.gguf_tensors import TensorInfo, read_rows, tensor_index

# What the K-quant kernels read (a Q4_0 tensor is packed as Q5_0, exactly).
KQUANT_BLOCK_TYPES = ("Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q4_0")
# A decoder layer's projections: HF's module path inside the layer -> llama.cpp's tensor name.
GGUF_PROJECTIONS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_PROJECTION = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(map(re.escape, GGUF_PROJECTIONS)) + r")$")
# The LM head's tensor: llama.cpp writes no output.weight for a tied head, which is then the embedding.
HEAD_TENSORS = ("output.weight", "token_embd.weight")
_HEAD_CHECK_ROWS = 16384  # rows of a head de-quantised at a time to check it (a 262k-row fp32 copy is 671 MB)


class UnsupportedBlocksError(ValueError):
    """Projections stored in block types the K-quant kernels do not read; `types` counts them."""

    def __init__(self, message: str, types: Counter[str]):
        super().__init__(message)
        self.types = types


@dataclass
class GGUFBlocks:
    """One projection's weight as the GGUF stores it: (out_features, bytes per row) of `kind` blocks."""

    kind: str  # "Q4_K", "Q5_0", ...
    type_id: int  # GGML type id
    raw: torch.Tensor  # (out_features, bytes per row) uint8
    in_features: int

    @property
    def out_features(self) -> int:
        return self.raw.shape[0]


def gguf_projection_names(model: nn.Module) -> dict[nn.Linear, tuple[str, str]]:
    """Each decoder projection -> (its HF name, llama.cpp's tensor name); other Linears are absent."""
    names = {}
    for name, mod in model.named_modules():
        found = _LAYER_PROJECTION.search(name)
        if isinstance(mod, nn.Linear) and found:
            names[mod] = (name, f"blk.{found.group(1)}.{GGUF_PROJECTIONS[found.group(2)]}.weight")
    return names


def hf_row_order(architecture: str, tensor: str, rows: int, config) -> np.ndarray | None:
    """Stored row of each of the `rows` HF rows of `tensor` where transformers permutes them as it
    loads (q and k of GGUF architecture "llama", see the module docstring), else None: as stored."""
    kind = tensor.split(".")[-2] if tensor.count(".") >= 2 else ""
    if architecture != "llama" or kind not in ("attn_q", "attn_k"):
        return None
    heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
    # transformers' _reverse_permute_weights applied to the row indices: HF row r is stored row order[r].
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(-1)


def stored_as(types: Counter[str]) -> str:
    """"Q5_0 (81 tensors), Q4_K (27 tensors)": block types by how many projections use them."""
    return ", ".join(f"{t} ({n} tensor{'s' * (n > 1)})" for t, n in types.most_common())


def kquant_table(model: nn.Module, gguf: str | Path) -> dict[nn.Linear, GGUFBlocks]:
    """Every decoder projection of `model` (an fp32 model de-quantised from `gguf`) as the file's
    blocks, each checked to reproduce the model's weights bit for bit.

    Raises UnsupportedBlocksError naming block types the kernels do not read, and ValueError where
    the kernels cannot run here, a decoder Linear has no tensor in the file, or a tensor does not
    reproduce its projection. The LM head is in the table too where the file stores it in K-quant
    blocks other than Q8_0 (`head_blocks`)."""
    ops = kernels.load()
    if ops is None:
        raise ValueError("weights='int4' runs GGUF K-quant blocks on exitspec's CPU kernels, which do not run "
                         f"here ({kernels.unavailable_reason()}); use weights='dense'")
    head = model.get_output_embeddings()
    names = gguf_projection_names(model)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head and mod not in names:
            raise ValueError(f"weights='int4' reads decoder projections from the GGUF by llama.cpp's names, and "
                             f"{name} has none; use weights='dense'")
    index = tensor_index(gguf)
    missing = [t for _, t in names.values() if t not in index]
    if missing:
        raise ValueError(f"{Path(gguf).name} has no tensor {missing[0]} (and {len(missing) - 1} more missing); is it "
                         "the file this model was loaded from? Use weights='dense'")
    kinds = Counter(index[t].kind for _, t in names.values())
    other = Counter({t: n for t, n in kinds.items() if t not in KQUANT_BLOCK_TYPES})
    if other:
        raise UnsupportedBlocksError(f"{Path(gguf).name} stores decoder projections as {stored_as(other)}", other)
    arch = read_summary(gguf).architecture
    table: dict[nn.Linear, GGUFBlocks] = {}
    for mod, (name, tensor) in names.items():
        info = index[tensor]
        if info.dims != (mod.in_features, mod.out_features):
            raise ValueError(f"{tensor} is {info.dims[::-1]} in {Path(gguf).name} but {name} is "
                             f"{tuple(mod.weight.shape)}; use weights='dense'")
        raw = read_rows(gguf, info)
        order = hf_row_order(arch, tensor, raw.shape[0], model.config)
        if order is not None:
            raw = raw[torch.from_numpy(order)]  # (out, bytes per row) in HF's row order
        _check_blocks(ops, info, raw, mod.weight, name)
        table[mod] = GGUFBlocks(info.kind, info.type_id, raw, mod.in_features)
    blocks = head_blocks(ops, head, index, gguf)
    if blocks is not None:
        table[head] = blocks
    return table


def head_blocks(ops, head: nn.Linear | None, index: dict[str, TensorInfo], gguf: str | Path) -> GGUFBlocks | None:
    """The LM head as the file's blocks where it stores them in a K-quant type other than Q8_0 and the
    kernels take its shape (whole 16-row tiles), checked bit for bit; None otherwise (a Q8_0 head runs on
    the q8 kernel, models/int4.Q8Linear; any other is a bf16 copy, which the runtime's `backend` names)."""
    info = next((index[t] for t in HEAD_TENSORS if t in index), None)
    if head is None or info is None or info.kind not in KQUANT_BLOCK_TYPES or info.kind == "Q8_0" \
            or info.dims != (head.in_features, head.out_features) or head.out_features % 16:
        return None
    raw = read_rows(gguf, info)
    _check_blocks(ops, info, raw, head.weight, "the LM head")
    return GGUFBlocks(info.kind, info.type_id, raw, head.in_features)


def _check_blocks(ops, info: TensorInfo, raw: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    """ValueError unless `raw` (out, bytes per row) decodes to `weight` (out, in) bit for bit; checked a
    slice of rows at a time, so a 262k-row head never needs a whole fp32 copy."""
    n_in = weight.shape[1]
    for r0 in range(0, raw.shape[0], _HEAD_CHECK_ROWS):
        dense = ops.dequantize_blocks(info.type_id, raw[r0: r0 + _HEAD_CHECK_ROWS].contiguous(), n_in)
        if not torch.equal(dense, weight[r0: r0 + _HEAD_CHECK_ROWS].detach().to(torch.float32)):
            raise ValueError(f"{info.name}'s {info.kind} blocks do not reproduce {name}'s weights bit for bit (a "
                             "file other than the one this model was loaded from?); use weights='dense'")


class QuantLinear:
    """y = x @ W.T + b with W one or more GGUF tensors stacked along the outputs (a fused q|k|v may
    mix block types), run from their blocks by exitspec's K-quant kernels; x is (..., in), y in x's
    dtype. Row-invariant by construction, so `min_rows` is not needed."""

    __slots__ = ("kernel", "bias", "in_features", "out_features", "types")

    def __init__(self, parts: list[GGUFBlocks], bias: torch.Tensor | None = None):
        ops = kernels.load()
        if ops is None:  # kquant_table refuses first; a table built under other settings lands here
            raise ValueError(f"GGUF K-quant blocks need exitspec's CPU kernels ({kernels.unavailable_reason()})")
        self.in_features = parts[0].in_features
        if any(p.in_features != self.in_features for p in parts):
            raise ValueError("a fused projection's parts must share their input size")
        self.kernel = ops.QuantMatrix(self.in_features, [(p.type_id, p.raw.contiguous()) for p in parts])
        self.out_features = self.kernel.out_features
        self.types = tuple(p.kind for p in parts)
        self.bias = None if bias is None else bias.detach().to(torch.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of blocks a call reads, as packed for the kernel (as compact as the file's)."""
        return self.kernel.nbytes

    def __call__(self, x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:  # (..., in) -> (..., out)
        lead = x.shape[:-1]
        y = self.kernel.forward(x.reshape(-1, self.in_features).to(torch.float32).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*lead, self.out_features)
