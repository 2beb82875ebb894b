"""`exitspec export-draft`: a trained exit as a standard draft model folder (export/draft.py).

    exitspec export-draft --heads runs/heads --exit-layer 8 --out runs/draft-8
    # then, e.g.: HF  model.generate(..., assistant_model=AutoModelForCausalLM.from_pretrained("runs/draft-8"))
    exitspec export-draft --heads runs/heads --exit-layer 8 --out runs/draft-8 --gguf Q8_0
    # also runs/draft-8/draft-Q8_0.gguf (export/gguf.py), e.g. for llama.cpp (server or example):
    #   llama-speculative-simple -m TARGET.gguf -md runs/draft-8/draft-Q8_0.gguf --spec-type draft-simple
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exitspec.commands.common import add_model_args, load_from_args
from exitspec.export.draft import EXPORTABLE, check_draft_vocab, export_draft
from exitspec.export.engines import llama_cpp_command, vllm_command
from exitspec.export.gguf import GGUF_TYPES, check_gguf, export_gguf


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--exit-layer", type=int, required=True, help="the exit to export (a layer of the bundle)")
    p.add_argument("--out", required=True, help="folder for the draft model (config, safetensors, tokenizer)")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="a reduced draft vocabulary (N most frequent tokens); exported only where the architecture's "
                        "LM head has a bias to push the other rows down, else refused")
    p.add_argument("--gguf", choices=tuple(GGUF_TYPES), default=None,
                   help="also write the draft as <out>/draft-<type>.gguf for llama.cpp (Llama / Mistral / Qwen2 "
                        "models with a byte-level BPE tokenizer)")


def run(args: argparse.Namespace) -> int:
    if not args.heads:
        raise ValueError(f"--heads is required: a bundle whose exit is of an exportable kind ({', '.join(EXPORTABLE)})")
    model = load_from_args(args)
    check_draft_vocab(model, args.draft_vocab)  # refused before anything is written
    if args.gguf:
        check_gguf(model)  # an unsupported model is refused before anything is written
    out = export_draft(model, model.heads, args.exit_layer, Path(args.out))
    print(f"wrote a {args.exit_layer}-layer {model.config.model_type} draft model to {out}")
    print(f"  HF:    model.generate(..., assistant_model=AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    print(f"  vLLM:  {vllm_command(model.source, out)}")
    if args.gguf:
        path = export_gguf(model, model.heads, args.exit_layer, out / f"draft-{args.gguf}.gguf", args.gguf)
        print(f"wrote the same draft as GGUF ({args.gguf}) for llama.cpp to {path}")
        print(f"  llama.cpp: {llama_cpp_command('TARGET.gguf', path)}")
    return 0
