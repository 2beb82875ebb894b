"""Where exitspec keeps files between runs: its cache folder (converted models, compiled kernels,
token rankings) and the public prompt sets beside a checkout."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EXITSPEC_CACHE``, else ``~/.cache/exitspec``."""
    return Path(os.environ.get("EXITSPEC_CACHE", Path.home() / ".cache" / "exitspec"))


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the repository checkout, when present (examples, tests, benchmarks)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").is_file() and cand.is_dir():
            return cand
    return None
