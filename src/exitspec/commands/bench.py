"""`exitspec bench`: strategies x exit layers x draft lengths x temperatures, against HF's decoders.

    exitspec bench --config benchmarks/default.toml --out benchmarks/default
    exitspec bench --run vanilla --run "self-spec exit_layer=8,12 gamma=3,5" --num-prompts 4 --out /tmp/b
    exitspec bench --strategies self-spec,hf-early-exit --exit-layers 8,12 --draft-lengths 4 --out /tmp/b
    exitspec bench --replot benchmarks/default          # redraw plots + report from the saved results

Writes results.csv, results.jsonl, categories.csv, layers.csv, audit.json, config.json, the figures
(PNG + PDF) and report.md into --out (see bench/results.py). Exit status 3 when the lossless audit
fails, 130 when interrupted (finished rows, plots and report are still written).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

from transformers.utils import logging as hf_logging

from exitspec.bench.config import BenchConfig, BenchConfigError, load_bench_prompts, load_toml, parse_run
from exitspec.bench.llama_cpp import ENV as LLAMA_SERVER_ENV
from exitspec.bench.report import finish
from exitspec.bench.runner import BenchRunner
from exitspec.commands.common import add_model_args, set_threads
from exitspec.loading import attach_heads, load

# Which option the --exit-layers / --draft-lengths shortcuts set, per contender (for --run, name it).
LAYER_OPTION = {"self-spec": "exit_layer", "dssd": "exit_layer", "hybrid": "exit_layer", "hf-early-exit": "exit_layer",
                "economize-early-exit": "exit_layer"}
DRAFT_OPTION = {"self-spec": "draft_len", "dssd": "draft_len", "hybrid": "draft_len", "economize-early-exit": "gamma",
                "hf-prompt-lookup": "num_tokens"}


def _list(cast):
    def parse(s: str):
        try:
            return [cast(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {s!r}") from None
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, heads=True)
    g = p.add_argument_group("sweep")
    g.add_argument("--config", default=None, help="TOML file with [bench] settings and [[run]] grids")
    g.add_argument("--out", default=None, help="results folder (created; existing result files are replaced)")
    g.add_argument("--replot", default=None, metavar="DIR", help="only redraw plots and report from DIR")
    g.add_argument("--run", action="append", default=[], metavar="'NAME key=v1,v2 ...'",
                   help="a contender and its option grid (repeatable), e.g. 'self-spec exit_layer=8,12 gamma=4'")
    g.add_argument("--strategies", type=_list(str), default=None,
                   help="comma-separated strategies/peers (vanilla, self-spec, dssd, cascade, mlp-skip, lookup, tree,"
                        " hybrid, hf-generate, hf-early-exit, hf-prompt-lookup, economize-early-exit)")
    g.add_argument("--exit-layers", type=_list(int), default=None, help="exit layers for --strategies that take one")
    g.add_argument("--draft-lengths", type=_list(int), default=None, help="draft lengths for --strategies")
    g.add_argument("--temperatures", type=_list(float), default=None, help="e.g. 0,0.7 (default 0 = greedy)")
    g.add_argument("--threshold-sweep", type=_list(float), default=None, metavar="T1,T2,...",
                   help="run every cascade / mlp-skip run without a threshold at each of these (speed-vs-quality "
                        "Pareto, plot threshold_pareto)")
    g.add_argument("--prompts", default=None, help="prompt file (MT-Bench/Spec-Bench/plain JSONL...) or 'heldout'")
    g.add_argument("--split", default=None,
                   help="split of --prompts: heldout (default), eval (the held-out records calibration never "
                        "takes), train, all")
    g.add_argument("--data-dir", default=None, help="folder of the shared prompt sets (default: ../shared/data)")
    g.add_argument("--num-prompts", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--repeats", type=int, default=None)
    g.add_argument("--warmup", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--interleave", action="store_true",
                   help="run every configuration in turn on each prompt (fair ratios on a machine whose speed drifts)")
    g.add_argument("--no-quality", action="store_true", help="skip the layer sweep and perplexities")
    g.add_argument("--no-dense-baselines", action="store_true",
                   help="leave out the dense vanilla loop and HF generate (slow on long runs); needs a vanilla --run")
    g.add_argument("--llama-server", default=None, metavar="PATH",
                   help="llama.cpp's llama-server binary for `llama.cpp` runs "
                        "(default: $EXITSPEC_LLAMA_SERVER, then PATH)")
    g.add_argument("--no-progress", action="store_true")


def build_config(args: argparse.Namespace):
    cfg = load_toml(args.config) if args.config else BenchConfig()
    for key in ("prompts", "split", "data_dir", "num_prompts", "max_new_tokens", "repeats", "warmup", "seed",
                "temperatures", "threshold_sweep"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    # Model options: the command line wins when it differs from its defaults.
    for key, default in (("model", "default"), ("dtype", "float32"), ("device", "cpu")):
        if getattr(args, key) != default:
            setattr(cfg, key, getattr(args, key))
    if args.heads:
        cfg.heads = None if args.heads == "none" else args.heads  # "none": ignore the config's bundle
    if args.threads:
        cfg.threads = args.threads
    if args.no_quality:
        cfg.quality = False
    if args.interleave:
        cfg.interleave = True
    if args.no_dense_baselines:
        cfg.dense_baselines = False
    runs = [parse_run(r) for r in args.run]
    for name in args.strategies or []:
        run: dict = {"name": name}
        if args.exit_layers and name in LAYER_OPTION:
            run[LAYER_OPTION[name]] = args.exit_layers
        if args.draft_lengths and name in DRAFT_OPTION:
            run[DRAFT_OPTION[name]] = args.draft_lengths
        runs.append(run)
    if (args.exit_layers or args.draft_lengths) and not args.strategies:
        raise BenchConfigError("--exit-layers / --draft-lengths apply to --strategies; name them, or use --run")
    if runs:
        cfg.runs = (cfg.runs if args.config else []) + runs
    cfg.validate()
    return cfg


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    if args.replot:
        out = Path(args.replot)
        figures = finish(out)
        print(f"redrew {', '.join(figures) or 'no figures'} and report.md in {out}")
        return 0
    if not args.out:
        raise ValueError("--out DIR is required (or --replot DIR to redraw a finished run)")
    cfg = build_config(args)
    if args.llama_server:
        os.environ[LLAMA_SERVER_ENV] = args.llama_server  # read by bench/llama_cpp.find_server
    prompts = load_bench_prompts(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()  # HF's per-call deprecation notes would bury the progress bar
    warnings.filterwarnings("ignore", category=FutureWarning)  # (so would peers' FutureWarnings)
    set_threads(cfg.threads)
    model = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if cfg.heads:
        attach_heads(model, cfg.heads)
    argv = sys.argv  # recorded for the report when run as a command (not from Python)
    command = "exitspec " + " ".join(shlex.quote(a) for a in argv[argv.index("bench"):]) if "bench" in argv else ""
    runner = BenchRunner(cfg, model, prompts, out, progress=not args.no_progress, command=command)
    print(f"bench: {len(runner.specs)} configurations x {len(prompts)} prompts x {cfg.repeats} repeats, "
          f"{cfg.max_new_tokens} tokens -> {out}", file=sys.stderr)
    # `timeout`/`kill` (SIGTERM) stops a run like Ctrl-C does: finished rows, plots and report are kept.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    outcome = runner.run()
    figures = finish(out)
    print(f"wrote {out}/results.csv ({len(outcome.rows)} rows), results.jsonl, report.md, "
          f"figures: {', '.join(figures) or 'none'}")
    for r in outcome.rows:
        if r.get("status") == "ok":
            sp = r.get("speedup")
            print(f"  {r['label']:<48} {r['tokens_per_s']:7.1f} tok/s  {sp if sp is None else f'{sp:.2f}x'}")
    if outcome.interrupted:
        print(f"interrupted: {len(outcome.rows)} finished rows kept in {out}", file=sys.stderr)
        return 130
    if outcome.audit_failed:
        print("LOSSLESS AUDIT FAILED: " + ", ".join(a.label for a in outcome.audit_failed)
              + f" (details in {out}/audit.json)", file=sys.stderr)
        return 3
    return 0
