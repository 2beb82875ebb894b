"""`exitspec export-draft`: a trained exit as a standard draft model folder (export/draft.py).

    exitspec export-draft --heads runs/heads --exit-layer 8 --out runs/draft-8
    # then, e.g.: HF  model.generate(..., assistant_model=AutoModelForCausalLM.from_pretrained("runs/draft-8"))
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exitspec.commands.common import add_model_args, load_from_args
from exitspec.export.draft import EXPORTABLE, export_draft


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--exit-layer", type=int, required=True, help="the exit to export (a layer of the bundle)")
    p.add_argument("--out", required=True, help="folder for the draft model (config, safetensors, tokenizer)")


def run(args: argparse.Namespace) -> int:
    if not args.heads:
        raise ValueError(f"--heads is required: a bundle whose exit is of an exportable kind ({', '.join(EXPORTABLE)})")
    model = load_from_args(args)
    out = export_draft(model, model.heads, args.exit_layer, Path(args.out))
    print(f"wrote a {args.exit_layer}-layer {model.config.model_type} draft model to {out}")
    return 0
