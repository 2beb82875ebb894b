"""What a GGUF file holds, read from its header alone: the architecture and each tensor's block type.

`exitspec.load` asks before the slow part (transformers de-quantises every tensor: ~1 min for Gemma 3
270M on 2 cores) whether it can run the file at all, and, for weights="int4", which block types the
decoder projections are stored in, so a refusal names them. gguf-py's GGUFReader parses every
metadata array into numpy views (15 s for Gemma 3's 262k-token vocabulary); this reader walks the
header once and skips arrays by their sizes, well under a second.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64;
metadata entries (key string, value type u32, value); then per tensor: name string, n_dims u32,
dims u64 x n_dims, block type u32, offset u64. A string is a u64 length and its bytes; an array is
an item type u32, a count u64 and the items.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFValueType

_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}

# Tensors of a decoder layer that are matrix products (llama.cpp's names): what weights="int4" runs.
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFSummary:
    architecture: str  # general.architecture, llama.cpp's name ("llama", "gemma3", ...)
    name: str | None  # general.name, where the file sets it
    tensor_types: dict[str, str]  # tensor name -> block type name ("Q4_K", "F32", ...)

    def projection_types(self) -> Counter[str]:
        """How many decoder projections (blk.N.<PROJECTIONS>.weight) are stored in each block type."""
        return Counter(t for name, t in self.tensor_types.items()
                       if name.startswith("blk.") and name.split(".")[2] in PROJECTIONS)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.at += n
        return bytes(self.buf[self.at - n: self.at]).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool):
        """The value of type `kind` (a string decoded only when `keep`); arrays are skipped: None."""
        if kind == GGUFValueType.STRING:
            return self.string() if keep else self.skip_string()
        if kind == GGUFValueType.ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:  # fixed-size items: one jump
                size = count * struct.calcsize(_SCALARS[item])
                self.at += size
            else:
                for _ in range(count):
                    self.value(item, keep=False)
            return None
        if kind not in _SCALARS:
            raise GGUFFormatError(f"unknown GGUF metadata value type {kind}")
        return self.take(_SCALARS[kind])

    def skip_string(self) -> None:
        n = self.take("<Q")  # read first: `self.at += self.take(...)` would add to the old offset
        self.at += n


def read_summary(path: str | Path) -> GGUFSummary:
    """The architecture, name and tensor block types of a GGUF file (GGUFFormatError if it is not one)."""
    path = Path(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            c = _Cursor(buf)
            if bytes(buf[:4]) != b"GGUF":
                raise GGUFFormatError(f"{path.name} is not a GGUF file (no GGUF magic at its start)")
            c.at = 4
            version = c.take("<I")
            if version < 2:
                raise GGUFFormatError(f"{path.name} is GGUF version {version}; version 2 or later is needed")
            n_tensors, n_kv = c.take("<Q"), c.take("<Q")
            meta: dict[str, object] = {}
            for _ in range(n_kv):
                key = c.string()
                meta[key] = c.value(c.take("<I"), keep=key in ("general.architecture", "general.name"))
            types: dict[str, str] = {}
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.take("<I")
                c.at += 8 * n_dims  # the dims
                kind = c.take("<I")
                c.at += 8  # the data offset
                types[name] = GGMLQuantizationType(kind).name if kind in GGMLQuantizationType._value2member_map_ \
                    else f"type {kind}"
        except struct.error as err:
            raise GGUFFormatError(f"{path.name} ends inside its GGUF header: the file is truncated") from err
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFFormatError(f"{path.name} names no general.architecture")
    name = meta.get("general.name")
    return GGUFSummary(architecture=arch, name=name if isinstance(name, str) else None, tensor_types=types)
