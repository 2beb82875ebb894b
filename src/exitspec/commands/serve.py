"""`exitspec serve`: load the model (and heads), then run the OpenAI-compatible server with uvicorn.

With no flags it serves the fastest path (commands/fast_path.py): the default model's int4 weights
on exitspec's kernels, its shipped heads and lookup; the startup line says what runs.

    exitspec serve --host 127.0.0.1 --port 8000
    exitspec serve --weights dense --heads none --strategy vanilla      # the plain fp32 reference
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings

import uvicorn  # the serve extra; `exitspec serve` says which package is missing

from exitspec.commands.common import add_model_args
from exitspec.commands.fast_path import describe, load_fastest, resolve_strategy
from exitspec.commands.generate import parse_options
from exitspec.decoding.api import NoHeadsWarning, make_strategy, no_heads_message
from exitspec.server.app import ServerConfig, create_app


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, fast=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--strategy", default="auto",
                   help="strategy for requests that name none (a request may pick its own: "
                        '"exitspec": {"strategy": ..., "options": {...}}); auto (default): lookup with heads '
                        "attached, else vanilla (both lossless)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the default strategy (repeatable), e.g. --option draft_len=4")
    g.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the model's name)")
    g.add_argument("--max-batch", type=int, default=32,
                   help="most requests decoded together, over every strategy (default 32); a request that "
                        "arrives while they run joins at the next decode step")
    g.add_argument("--max-queue", type=int, default=256,
                   help="most requests waiting for a row; beyond it requests get 503 with Retry-After (default 256)")
    g.add_argument("--default-max-tokens", type=int, default=256,
                   help="completion length when a request sends no max_tokens (default 256)")
    g.add_argument("--max-context", type=int, default=None,
                   help="most prompt + completion tokens per request (default: the model's context); longer "
                        "requests get 400 context_length_exceeded")
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body; larger ones get 413 (default 4 MiB)")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt positions prefilled between two decode steps, so that a long prompt does not "
                        "stall running streams (default 256; 0 = whole prompts at once)")
    g.add_argument("--stream-interval-ms", type=float, default=ServerConfig.stream_interval_ms,
                   help="send a stream's new text at most this often, in ms (default %(default)g; 0: after every "
                        "decode step); fewer, larger chunks cost the server and the client less CPU, which on a "
                        "machine with few cores is taken from decoding. The first token is never held back")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT / SIGTERM, seconds running streams get to finish before they are ended "
                        "with a 503 (default 30)")
    g.add_argument("--allow-untrained-heads", action="store_true",
                   help="serve self-spec, dssd, cascade and mlp-skip without --heads (untrained logit-lens "
                        "heads: slower than vanilla); refused by default")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    for name in ("max_batch", "max_queue", "default_max_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_context is not None and args.max_context < 2:
        raise ValueError("--max-context must be at least 2")
    if args.prefill_chunk < 0 or args.shutdown_timeout < 0 or args.stream_interval_ms < 0:
        raise ValueError("--prefill-chunk, --shutdown-timeout and --stream-interval-ms must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    options = parse_options(args.option)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model, notes = load_fastest(args)
    args.strategy = resolve_strategy(args.strategy, model)
    config = ServerConfig(strategy=args.strategy, options=options, served_name=args.served_model_name,
                          max_batch=args.max_batch, max_queue=args.max_queue,
                          default_max_tokens=args.default_max_tokens, max_context=args.max_context,
                          max_body_bytes=args.max_body_bytes, prefill_tokens=args.prefill_chunk or None,
                          stream_interval_ms=args.stream_interval_ms,
                          allow_untrained_heads=args.allow_untrained_heads)
    # Validate the default strategy now: a typo should stop the server, not fail every request.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoHeadsWarning)  # refused below unless allowed
        strategy = make_strategy(args.strategy, model, **options)
    if strategy.needs_heads and model.heads is None and not args.allow_untrained_heads:
        raise ValueError(no_heads_message(args.strategy).replace("Attach trained heads:", "Start the server with")
                         + " (or pass --allow-untrained-heads)")
    strategy.warm_up(model.lm, args.max_batch)  # e.g. lookup's batch cost table: measured before requests come
    app = create_app(model, config, worker_thread=False)
    name = config.served_name or model.name
    print(f"exitspec serve: {name} on http://{args.host}:{args.port}/v1 - "
          f"{describe(model, str(strategy.describe()), notes)}; continuous batching up to {args.max_batch} rows",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    return serve_beside(server, app.state.server.scheduler)


def serve_beside(server: uvicorn.Server, scheduler) -> int:
    """uvicorn on a thread of its own, the decode worker on this one: the thread that loaded the model
    runs all torch work (server/scheduler.py says why that is a third of the speed on 2 cores).

    uvicorn installs no signal handlers off the main thread, so SIGINT / SIGTERM are caught here and
    start its graceful shutdown (a second one forces it); its lifespan's end closes the scheduler,
    which ends `scheduler.run()`."""
    def http() -> None:
        try:
            server.run()
        finally:  # a failed start (port taken) or the end of a shutdown: stop the decode worker too
            scheduler.close()

    def stop(signum, frame) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    thread = threading.Thread(target=http, name="exitspec-http")
    thread.start()
    scheduler.run()
    thread.join()
    return 0 if server.started else 1
