"""Training checkpoints as a folder of safetensors + JSON, never pickle.

    WORK/checkpoint/tensors.safetensors   every tensor of the state (heads, optimizer moments, RNG)
    WORK/checkpoint/state.json            everything else, with {"__tensor__": name} where a tensor was

A pickle file (torch.save) runs code when it is read, so a checkpoint handed from one machine to
another would be a way in; safetensors holds only named arrays, and JSON only data. The state is
any nest of dicts, lists, tuples (read back as lists), numbers, strings, None and tensors; dicts
whose keys are not all strings (an optimizer's per-parameter state, keyed by index) keep their keys'
types. The folder is written with atomic_dir, so a kill mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exitspec.atomic import atomic_dir

TENSORS = "tensors.safetensors"
STATE = "state.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of a kind exitspec does not read; the message says what to do."""


def _encode(x, key: str, tensors: dict[str, torch.Tensor]):
    if torch.is_tensor(x):
        # clone: safetensors refuses tensors that share storage (tied or sliced weights)
        tensors[key] = x.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in x.items()}
        return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(x)]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"a checkpoint holds no {type(x).__name__} (at {key}); store it as data or a tensor")


def _decode(x, tensors: dict[str, torch.Tensor]):
    if isinstance(x, dict):
        if set(x) == {"__tensor__"}:
            return tensors[x["__tensor__"]]
        if set(x) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in x["__items__"]}
        return {k: _decode(v, tensors) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    return x


def save_checkpoint(folder: str | Path, state: dict) -> Path:
    """Write `state` to `folder` atomically (see the module docstring for what it may hold)."""
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "state": _encode(state, "state", tensors)}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        (tmp / STATE).write_text(json.dumps(doc))
    return Path(folder)


def load_checkpoint(folder: str | Path) -> dict:
    """The state saved in `folder`; CheckpointError with what to do where it cannot be read."""
    folder = Path(folder)
    fix = f"delete {folder} to start from step 0, or pass another work folder"
    if not (folder / STATE).is_file() or not (folder / TENSORS).is_file():
        raise CheckpointError(f"{folder} is not a complete exitspec checkpoint (it needs {STATE} and {TENSORS}); {fix}")
    try:
        doc = json.loads((folder / STATE).read_text())
        tensors = load_file(str(folder / TENSORS))
    except Exception as err:  # OSError, JSONDecodeError, safetensors' own SafetensorError
        raise CheckpointError(f"checkpoint {folder} is unreadable ({type(err).__name__}: {err}); {fix}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder} has format {doc.get('format') if isinstance(doc, dict) else '?'}"
                              f", this exitspec reads format {FORMAT}; {fix}")
    try:
        return _decode(doc["state"], tensors)
    except KeyError as err:
        raise CheckpointError(f"checkpoint {folder} names tensor {err} that its {TENSORS} lacks; {fix}") from err
