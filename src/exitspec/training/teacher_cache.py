"""The teacher's sparse targets (top-k logits per trained position) of a whole data set, on disk and
memory-mapped, for reuse across training runs (`teacher_cache` in the config).

Written once by a full teacher pass (the pass a streamed run makes anyway to choose its KD
vocabulary), read by every later run: a step then runs the frozen base only up to the deepest exit
(the exits' hidden states change with the exits, so they are never cached) and reads the rest, the
remaining layers and the LM head over the vocabulary, from the file. Memory does not grow with the
data set: the file is mapped, not loaded.

    FOLDER/meta.json            what the targets were made from (model fingerprint, data digest, k, mask rule)
    FOLDER/offsets.bin          int64 (n + 1,): example i's rows are offsets[i]..offsets[i+1]
    FOLDER/top_ids.bin          int32 (N, k)
    FOLDER/top_logits.bin       float32 (N, k)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exitspec.atomic import atomic_dir

META = "meta.json"


@dataclass
class SparseTargets:
    offsets: np.ndarray  # (n + 1,) int64
    top_ids: np.ndarray  # (N, k) int32, memory-mapped
    top_logits: np.ndarray  # (N, k) float32, memory-mapped

    def of(self, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Example i's (top ids (n, k) long, top logits (n, k) float)."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return (torch.from_numpy(np.array(self.top_ids[lo:hi])).long().to(device),
                torch.from_numpy(np.array(self.top_logits[lo:hi])).to(device))

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])


def cache_meta(fingerprint: dict, examples, topk: int, answer_only: bool) -> dict:
    """What makes targets reusable: the same model, the same token sequences and answer marks, the same
    k, the same rule for which positions are trained."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray(e.ids, dtype=np.int64).tobytes())
        h.update(np.asarray([e.start], dtype=np.int64).tobytes())
        if e.answer is not None:
            h.update(np.asarray(e.answer, dtype=np.bool_).tobytes())
    return {"fingerprint": fingerprint, "examples": len(examples), "data_sha256": h.hexdigest(), "topk": topk,
            "answer_only": answer_only}


def open_cache(folder: str | Path, meta: dict) -> SparseTargets | None:
    """The targets in `folder` if they were made from exactly `meta`, else None."""
    folder = Path(folder)
    try:
        stored = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if stored.get("made_from") != meta:
        return None
    rows, k = stored["rows"], meta["topk"]
    offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
    if len(offsets) != meta["examples"] + 1 or int(offsets[-1]) != rows:
        return None
    return SparseTargets(offsets, np.memmap(folder / "top_ids.bin", dtype=np.int32, mode="r", shape=(rows, k)),
                         np.memmap(folder / "top_logits.bin", dtype=np.float32, mode="r", shape=(rows, k)))


def build_cache(folder: str | Path, meta: dict, batches) -> SparseTargets:
    """Write the targets that `batches` yields (lists of per-example Targets, in example order), then
    open them. Written beside the folder and renamed into place: a killed build leaves no cache. An
    existing folder is replaced only where it holds an earlier cache, never other files."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / META).is_file())):
        raise ValueError(f"teacher_cache {folder} exists and holds no teacher cache; choose a new folder")
    offsets = [0]
    with atomic_dir(folder) as tmp:
        with open(tmp / "top_ids.bin", "wb") as f_ids, open(tmp / "top_logits.bin", "wb") as f_val:
            for targets in batches:
                for t in targets:
                    f_ids.write(t.top_ids.to(torch.int32).cpu().numpy().tobytes())
                    f_val.write(t.top_logits.to(torch.float32).cpu().numpy().tobytes())
                    offsets.append(offsets[-1] + t.tokens)
        np.asarray(offsets, dtype=np.int64).tofile(tmp / "offsets.bin")
        (tmp / META).write_text(json.dumps({"made_from": meta, "rows": offsets[-1]}, indent=1))
    opened = open_cache(folder, meta)
    assert opened is not None, "a cache just written must open"
    return opened
