"""The `exitspec` command: a thin dispatcher over the Python API.

Each subcommand is one module of exitspec/commands/ exposing `add_arguments(parser)` and
`run(args) -> int`: it parses, calls its stage's Python API and prints. Modules are imported only
when their command runs, so `exitspec generate` never pays for the training or server imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from exitspec import __version__

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("exitspec.commands.demo", "the main job: side-by-side decoding on the embedded default model"),
    "generate": ("exitspec.commands.generate", "generate text (streams to the terminal, prints tokens/s)"),
    "info": ("exitspec.commands.info", "layout, parameters, step cost by k; with --heads, self-spec cost per exit"),
    "bench-runtime": (
        "exitspec.commands.bench_runtime", "tokens/s of HF generate vs the vanilla loop; k-row step cost"),
    "bench-scale": ("exitspec.commands.bench_scale", "training memory and self-spec cost model at 1B-8B shapes"),
    "train": ("exitspec.commands.train", "train exit heads by distillation from the frozen model"),
    "datastore": ("exitspec.commands.datastore", "rebuild a bundle's lookup datastore from the model's own answers"),
    "train-lookahead": ("exitspec.commands.train_lookahead", "add a lookahead draft head (EAGLE-style) to a bundle"),
    "calibrate": ("exitspec.commands.calibrate", "choose per-exit confidence thresholds on held-out data"),
    "eval-heads": ("exitspec.commands.eval_heads", "per-exit KL, perplexity, agreement and coverage"),
    "export-draft": ("exitspec.commands.export_draft", "write a trained exit as a standard draft model folder"),
    "bench": ("exitspec.commands.bench", "benchmark strategies and peers: results.csv, plots, report"),
    "lm-eval": ("exitspec.commands.lm_eval", "task accuracy of a decoding mode through lm-evaluation-harness"),
    "serve": ("exitspec.commands.serve", "OpenAI-compatible HTTP server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exitspec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("exitspec"):
            print(f"exitspec {name}: this command is not available in this build", file=sys.stderr)
            return 2
        print(f"exitspec {name}: missing dependency {err.name!r}; install the matching extra, "
              f"e.g. pip install 'exitspec[train,bench,serve]'", file=sys.stderr)
        return 2
    sub = argparse.ArgumentParser(prog=f"exitspec {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Our errors carry a message that says what to do; a traceback would only hide it.
        print(f"exitspec {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
