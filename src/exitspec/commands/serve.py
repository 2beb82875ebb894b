"""`exitspec serve`: load the model (and heads), then run the OpenAI-compatible server with uvicorn.

    exitspec serve --model default --strategy vanilla --host 127.0.0.1 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn  # the serve extra; `exitspec serve` says which package is missing

from exitspec.commands.common import add_model_args, load_from_args
from exitspec.commands.generate import parse_options
from exitspec.decoding.api import make_strategy
from exitspec.server.app import ServerConfig, create_app


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--strategy", default="vanilla",
                   help="strategy for requests that name none (a request may pick its own: "
                        '"exitspec": {"strategy": ..., "options": {...}})')
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the default strategy (repeatable), e.g. --option draft_len=4")
    g.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the model's name)")
    g.add_argument("--max-batch", type=int, default=32, help="most requests decoded together (default 32)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="most requests waiting; beyond it requests get 503 (default 256)")
    g.add_argument("--default-max-tokens", type=int, default=256,
                   help="completion length when a request sends no max_tokens (default 256)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    for name in ("max_batch", "max_queue", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    options = parse_options(args.option)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = load_from_args(args)
    config = ServerConfig(strategy=args.strategy, options=options, served_name=args.served_model_name,
                          max_batch=args.max_batch, max_queue=args.max_queue,
                          default_max_tokens=args.default_max_tokens)
    app = create_app(model, config)
    # Validate the default strategy now: a typo should stop the server, not fail every request.
    try:
        make_strategy(args.strategy, model, **options)
    except TypeError as err:  # a factory refusing an option name
        raise ValueError(f"strategy {args.strategy!r} does not take these options {options}: {err}") from None
    name = config.served_name or model.name
    print(f"exitspec serve: {name} ({args.strategy}) on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
