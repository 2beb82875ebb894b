"""Where each tensor of a GGUF file lies, and its blocks as stored: what weights="int4" reads for a
K-quant GGUF (models/kquants.py), whose blocks cannot be recovered from the de-quantised weights
transformers loads (a Q4_K sub-block's 6-bit scale and minimum are not fixed by its 32 values).

The header is walked as models/gguf_file.py walks it (its cursor, arrays skipped by their sizes; gguf-py's
GGUFReader takes ~15 s on Gemma 3's 262k-token vocabulary), keeping each tensor's dimensions, block type
and offset. The data section starts at the first multiple of `general.alignment` (32 unless the file
says otherwise) after the tensor table; a tensor's offset counts from there. Dimensions are GGML's,
innermost first: a weight (out, in) is stored as `in` values per row (whole blocks), `out` rows.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from exitspec.models.gguf_file import GGUFFormatError, _Cursor

ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int  # GGML type id (gguf-py's GGMLQuantizationType)
    dims: tuple[int, ...]  # GGML order, innermost (the row) first
    offset: int  # absolute byte offset in the file

    @property
    def kind(self) -> str:
        """The block type's name ("Q4_K", "F32", ...)."""
        known = GGMLQuantizationType._value2member_map_
        return GGMLQuantizationType(self.type_id).name if self.type_id in known else f"type {self.type_id}"

    @property
    def rows(self) -> int:
        return math.prod(self.dims[1:])

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type_id)]
        if self.dims[0] % block:
            raise GGUFFormatError(f"{self.name}: a row of {self.dims[0]} values is not whole {self.kind} blocks")
        return self.dims[0] // block * size


def tensor_index(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a GGUF file by name (GGUFFormatError if the header cannot be read)."""
    path = Path(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise GGUFFormatError(f"{path.name} is not a GGUF file (no GGUF magic at its start)")
            c = _Cursor(buf)
            c.at = 8  # magic, version (read_summary checks it)
            n_tensors, n_kv = c.take("<Q"), c.take("<Q")
            alignment = DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = c.string()
                value = c.value(c.take("<I"), keep=False)
                if key == ALIGNMENT_KEY and isinstance(value, int):
                    alignment = value
            entries = []
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.take("<I")
                dims = tuple(c.take("<Q") for _ in range(n_dims))
                entries.append((name, c.take("<I"), dims, c.take("<Q")))
            size = len(buf)
        except struct.error as err:
            raise GGUFFormatError(f"{path.name} ends inside its GGUF header: the file is truncated") from err
    start = -(-c.at // alignment) * alignment
    index = {name: TensorInfo(name, kind, dims, start + offset) for name, kind, dims, offset in entries}
    for t in index.values():
        if t.offset > size:
            raise GGUFFormatError(f"{path.name}: tensor {t.name} lies past the end of the file (truncated?)")
    return index


def read_rows(path: str | Path, t: TensorInfo) -> torch.Tensor:
    """The tensor's blocks as stored: (rows, bytes per row) uint8, one row per output."""
    count = t.rows * t.row_bytes
    data = np.fromfile(path, dtype=np.uint8, count=count, offset=t.offset)
    if data.size != count:
        raise GGUFFormatError(f"{Path(path).name}: tensor {t.name} is cut short (the file is truncated)")
    return torch.from_numpy(data).view(t.rows, t.row_bytes)
