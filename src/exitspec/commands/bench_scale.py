"""`exitspec bench-scale`: training memory and the self-speculation cost model at 1B-8B shapes, with
random weights, on this machine (bench/scale.py). Writes results.json and scale.md into --out.

    exitspec bench-scale --out benchmarks/scale-avx512
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from exitspec.bench.machine import describe_machine, machine_line
from exitspec.bench.scale import SHAPES, cost_model, extrapolated_cost_model, report, train_case
from exitspec.commands.common import set_threads


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="folder for results.json and scale.md")
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES),
                   help="the model trained and measured whole")
    p.add_argument("--examples", type=_ints, default=[1000, 4000], help="training set sizes, one process each")
    p.add_argument("--steps", type=int, default=3, help="training steps per case")
    p.add_argument("--exits", type=_ints, default=[4, 8, 12], help="exits of the cost model of --shape")
    p.add_argument("--big", default="llama-3.1-8b", choices=sorted(SHAPES), help="the model too big to build whole")
    p.add_argument("--big-layers", type=int, default=4, help="layers of --big that are built and measured")
    p.add_argument("--big-exits", type=_ints, default=[8, 16, 24], help="exits of the cost model of --big")
    p.add_argument("--draft-len", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--replot", metavar="DIR", help="rewrite DIR/scale.md from DIR/results.json")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one training case, JSON to stdout


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.case:  # a child process: its peak RSS is this case's alone
        print(json.dumps(train_case(SHAPES[args.shape], int(args.case), steps=args.steps)))
        return 0
    if args.replot:
        folder = Path(args.replot)
        if not (folder / "results.json").is_file():
            raise FileNotFoundError(f"{folder} holds no results.json of `exitspec bench-scale`")
        (folder / "scale.md").write_text(report(json.loads((folder / "results.json").read_text())))
        return 0
    if not args.out:
        raise ValueError("--out DIR is required (or --replot DIR)")
    if any(n < 1 for n in args.examples) or args.steps < 1 or args.draft_len < 1:
        raise ValueError("--examples, --steps and --draft-len must be >= 1")
    L, big_L = SHAPES[args.shape]["num_hidden_layers"], SHAPES[args.big]["num_hidden_layers"]
    if any(not 0 < e < L for e in args.exits) or any(not 0 < e < big_L for e in args.big_exits):
        raise ValueError(f"exits must lie inside the models: 1..{L - 1} for {args.shape}, "
                         f"1..{big_L - 1} for {args.big}")
    if not 0 < args.big_layers <= big_L:
        raise ValueError(f"--big-layers must lie in 1..{big_L}")
    train = []
    for n in args.examples:
        cmd = [sys.executable, "-m", "exitspec.cli", "bench-scale", "--shape", args.shape, "--case", str(n),
               "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"training case with {n} examples failed: {done.stderr.strip()[-2000:]}")
        case = json.loads(done.stdout.strip().splitlines()[-1])
        train.append({**case, "shape": args.shape})
        print(f"train {n} examples: {case['step_s']:.1f} s/step, peak RSS {case['peak_rss_mib']:.0f} MiB", flush=True)
    models = {args.shape: cost_model(SHAPES[args.shape], args.exits, gamma=args.draft_len)}
    print(f"cost model of {args.shape} done", flush=True)
    models[args.big] = extrapolated_cost_model(SHAPES[args.big], args.big_layers, args.big_exits, gamma=args.draft_len)
    machine = describe_machine()
    result = {"shapes": [args.shape, args.big], "machine": machine_line(machine), "machine_detail": machine,
              "command": "exitspec " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("bench-scale"):])
              if "bench-scale" in sys.argv else "", "train": train, "cost_models": models}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "scale.md").write_text(report(result))
    print(report(result))
    return 0
