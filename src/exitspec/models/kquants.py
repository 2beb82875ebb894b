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
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from exitspec import kernels
from exitspec.models.gguf_tensors import read_rows, tensor_index

# What the K-quant kernels read (a Q4_0 tensor is packed as Q5_0, exactly).
KQUANT_BLOCK_TYPES = ("Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q4_0")
# A decoder layer's projections: HF's module path inside the layer -> llama.cpp's tensor name.
GGUF_PROJECTIONS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_PROJECTION = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(map(re.escape, GGUF_PROJECTIONS)) + r")$")


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


def stored_as(types: Counter[str]) -> str:
    """"Q5_0 (81 tensors), Q4_K (27 tensors)": block types by how many projections use them."""
    return ", ".join(f"{t} ({n} tensor{'s' * (n > 1)})" for t, n in types.most_common())


def kquant_table(model: nn.Module, gguf: str | Path) -> dict[nn.Linear, GGUFBlocks]:
    """Every decoder projection of `model` (an fp32 model de-quantised from `gguf`) as the file's
    blocks, each checked to reproduce the model's weights bit for bit.

    Raises UnsupportedBlocksError naming block types the kernels do not read, and ValueError where
    the kernels cannot run here, a decoder Linear has no tensor in the file, or a tensor does not
    reproduce its projection."""
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
    table: dict[nn.Linear, GGUFBlocks] = {}
    for mod, (name, tensor) in names.items():
        info = index[tensor]
        if info.dims != (mod.in_features, mod.out_features):
            raise ValueError(f"{tensor} is {info.dims[::-1]} in {Path(gguf).name} but {name} is "
                             f"{tuple(mod.weight.shape)}; use weights='dense'")
        raw = read_rows(gguf, info)
        dense = ops.dequantize_blocks(info.type_id, raw, mod.in_features)
        if not torch.equal(dense, mod.weight.detach().to(torch.float32)):
            raise ValueError(f"{tensor}'s {info.kind} blocks do not reproduce {name}'s weights bit for bit (a file "
                             "other than the one this model was loaded from?); use weights='dense'")
        table[mod] = GGUFBlocks(info.kind, info.type_id, raw, mod.in_features)
    return table


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

    def __call__(self, x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:  # (..., in) -> (..., out)
        lead = x.shape[:-1]
        y = self.kernel.forward(x.reshape(-1, self.in_features).to(torch.float32).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*lead, self.out_features)
