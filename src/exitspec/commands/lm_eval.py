"""`exitspec lm-eval`: lm-evaluation-harness with exitspec's decoding modes as the model (bench/tasks.py).

    exitspec lm-eval --model exitspec --model_args model=default,heads=default,strategy=cascade,threshold=0.9 \
        --tasks gsm8k_local --include_path my_tasks/ --limit 60

Every argument is lm_eval's own; this command only registers the `exitspec` model first (lm_eval finds
models by name in its registry and has no plugin discovery). Needs the `eval` extra.
"""

from __future__ import annotations

import argparse
import sys

from exitspec.bench.tasks import EXTRA_HINT, register


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("harness_args", nargs=argparse.REMAINDER, help="lm_eval's arguments (see `lm_eval --help`)")


def run(args: argparse.Namespace) -> int:
    try:
        register()
        from lm_eval.__main__ import cli_evaluate  # optional: the eval extra
    except ModuleNotFoundError:
        print(f"exitspec lm-eval: {EXTRA_HINT}", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, ["lm_eval", *args.harness_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
