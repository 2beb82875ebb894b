"""The FastAPI app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, plus /health.

Handlers read the body (capped: 413 beyond `max_body_bytes`), validate it, tokenise it on a
thread of its own (a long prompt must not stall other connections on the event loop), then hand a
`Job` to the scheduler's decode thread and await its results. Streams are server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`. exitspec's own numbers (strategy, batch size, accepted drafts, exit
histogram, tokens/s) ride in an "exitspec" field of the response (of the last chunk when streaming),
which standard clients ignore; a request picks its strategy with `"exitspec": {"strategy": ...,
"options": {...}}` (the openai client: `extra_body={"exitspec": {...}}`). `GET /metrics` serves
Prometheus metrics (metrics.py).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exitspec.decoding.api import encode_prompt, make_strategy, no_heads_message
from exitspec.decoding.config import GenerationError
from exitspec.server.metrics import CONTENT_TYPE, Metrics
from exitspec.server.protocol import APIError, CompletionRequest, parse_chat, parse_completion, parse_json
from exitspec.server.scheduler import DecodeSettings, Delta, Failed, Finished, Job, Scheduler

KEEPALIVE_S = 2.0  # how often a waiting handler checks that its client is still there


@dataclass
class ServerConfig:
    strategy: str = "vanilla"  # used when a request names none
    options: dict = field(default_factory=dict)  # options of the default strategy
    served_name: str | None = None  # the model id clients send; None: the loaded model's name
    max_batch: int = 32  # most rows decoded at once, over every strategy
    max_queue: int = 256  # most requests waiting for a row; beyond it 503 + Retry-After
    default_max_tokens: int = 256  # when a request sends no max_tokens (capped by the context)
    max_context: int | None = None  # most prompt + completion tokens per request; None: the model's context
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    prefill_tokens: int | None = 256  # positions per prefill chunk between decode steps (None: whole prompts)
    # A stream's new text is sent at most this often (0: after every step). 20 updates a second read
    # as smoothly as a token each, and the chunks saved are CPU the decode threads get back
    # (benchmarks/load_test.md: one stream through the server vs in process, with and without).
    stream_interval_ms: float = 50.0
    allow_untrained_heads: bool = False  # serve head strategies with no heads attached (logit-lens heads)


class Server:
    """Everything the handlers share: the model, the scheduler, the config."""

    def __init__(self, model, config: ServerConfig):
        self.model, self.config = model, config
        self.name = config.served_name or model.name
        self.created = int(time.time())
        self.metrics = Metrics(waiting=lambda: self.scheduler.waiting, running=lambda: self.scheduler.running)
        self.scheduler = Scheduler(model, max_batch=config.max_batch, max_queue=config.max_queue,
                                   prefill_tokens=config.prefill_tokens, metrics=self.metrics,
                                   stream_interval_s=config.stream_interval_ms / 1000)
        # HF fast tokenizers are not safe to call from two threads at once; the decode thread uses
        # the model's tokenizer (detokenising), one tokenising thread this copy.
        self.encoder = copy.deepcopy(model.tokenizer)
        self.tokenising = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exitspec-tokenise")
        self.context = min(config.max_context or model.lm.max_positions, model.lm.max_positions)
        self._strategies: dict[tuple[str, str], int | APIError] = {}

    async def extra_positions(self, name: str, options_json: str) -> int:
        """Build the strategy once per (name, options) to validate them; cache slots it needs."""
        key = (name, options_json)
        if key not in self._strategies:
            if len(self._strategies) >= 256:  # clients can send any number of option sets: keep the memo bounded
                self._strategies.clear()
            try:
                options = json.loads(options_json)
                strat = await asyncio.wrap_future(self.scheduler.call(
                    lambda: make_strategy(name, self.model, **options)))  # torch work: on the worker thread
                if strat.needs_heads and self.model.heads is None and not self.config.allow_untrained_heads:
                    raise GenerationError(no_heads_message(name).replace("Attach trained heads:", "Start the "
                                                                         "server with trained heads:"))
                self._strategies[key] = strat.extra_positions()
            except (GenerationError, ValueError, TypeError) as err:
                self._strategies[key] = APIError(400, f"strategy {name!r} with options {options_json}: {err}",
                                                 param="exitspec", code="invalid_strategy")
        got = self._strategies[key]
        if isinstance(got, APIError):
            raise got
        return got

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            vocab = self.model.lm.vocab_size
            if any(t < 0 or t >= vocab for t in req.prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                               code="invalid_value")
            return list(req.prompt)
        try:
            ids = encode_prompt(self.encoder, req.prompt, chat=req.kind == "chat")
        except GenerationError as err:
            param = "messages" if req.kind == "chat" else "prompt"
            raise APIError(400, str(err), param=param) from None
        if not ids:
            raise APIError(400, "the prompt encodes to zero tokens", param="prompt")
        return ids

    async def make_job(self, req: CompletionRequest) -> Job:
        if req.model not in (self.name, self.model.source):
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r} "
                           "(see GET /v1/models)", param="model", code="model_not_found")
        ids = await asyncio.get_running_loop().run_in_executor(self.tokenising, self.prompt_ids, req)
        strategy = req.strategy or self.config.strategy
        options = dict(self.config.options) if strategy == self.config.strategy else {}
        options.update(req.options)
        options_json = json.dumps(options, sort_keys=True)
        extra = await self.extra_positions(strategy, options_json)
        context, limit = self.context, ("this server's --max-context" if self.context < self.model.lm.max_positions
                                        else "this model's maximum context length")
        room = context - len(ids) - extra - 1
        prompt_param = "messages" if req.kind == "chat" else "prompt"
        if room <= 0:  # the prompt alone does not fit, whatever max_tokens says
            raise APIError(400, f"{limit} is {context} tokens, but the prompt has {len(ids)} (and the strategy "
                           f"reserves {extra + 1}); shorten the prompt", param=prompt_param,
                           code="context_length_exceeded")
        max_tokens = req.max_tokens or min(self.config.default_max_tokens, room)
        if max_tokens > room:
            raise APIError(400, f"{limit} is {context} tokens, but you requested {len(ids) + max_tokens} "
                           f"({len(ids)} in the prompt, {max_tokens} for the completion, {extra + 1} reserved by "
                           f"the strategy); lower max_tokens to at most {room} or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        settings = DecodeSettings(strategy=strategy, options_json=options_json, temperature=req.temperature,
                                  top_p=req.top_p, seed=req.seed, stop=tuple(req.stop))
        return Job(prompt_ids=ids, max_tokens=max_tokens, settings=settings, extra_positions=extra,
                   loop=asyncio.get_running_loop())


async def _next(job: Job, request: Request) -> Delta | Finished | Failed | None:
    """The job's next message, or None when the client disconnected while we waited."""
    if not job.queue.empty():
        return job.queue.get_nowait()
    while True:
        try:
            return await asyncio.wait_for(job.queue.get(), timeout=KEEPALIVE_S)
        except TimeoutError:
            if await request.is_disconnected():
                return None


def _queued_text(job: Job) -> tuple[str, Finished | Failed | None]:
    """The text of the Deltas already queued behind the one in hand, and the message that ended the
    run of Deltas, if one is queued.

    Why: each chunk costs JSON and a socket write here and a parse in the client, on the same cores
    as the decode threads; a stream whose event loop fell behind catches up with one larger chunk
    instead of falling further behind.
    """
    texts: list[str] = []
    while not job.queue.empty():
        msg = job.queue.get_nowait()
        if not isinstance(msg, Delta):
            return "".join(texts), msg
        texts.append(msg.text)
    return "".join(texts), None


def _usage(job: Job, done: Finished) -> dict:
    p = len(job.prompt_ids)
    return {"prompt_tokens": p, "completion_tokens": done.completion_tokens,
            "total_tokens": p + done.completion_tokens}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class _Responder:
    """Formats one request's results as an OpenAI chat completion or text completion."""

    def __init__(self, server: Server, req: CompletionRequest, job: Job):
        self.req, self.job, self.model, self.metrics = req, job, server.name, server.metrics
        self.chat = req.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def full(self, text: str, done: Finished) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.reason}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=_usage(self.job, done), exitspec=done.stats)

    def chunk(self, text: str | None = None, reason: str | None = None, role: bool = False, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if self.req.include_usage:
            extra.setdefault("usage", None)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    async def events(self, first: Delta | Finished | Failed, request: Request) -> AsyncIterator[str]:
        msg: Delta | Finished | Failed | None = first
        outcome: int | None = None  # the status the stream ended with; None: the client left first
        try:
            if self.chat:
                yield _sse(self.chunk(role=True))
            while True:
                if isinstance(msg, Delta):
                    more, after = _queued_text(self.job)
                    yield _sse(self.chunk(msg.text + more))
                    if after is not None:
                        msg = after
                        continue
                elif isinstance(msg, Finished):
                    outcome = 200
                    yield _sse(self.chunk(reason=msg.reason, exitspec=msg.stats))
                    if self.req.include_usage:
                        yield _sse(self._envelope("chat.completion.chunk" if self.chat else "text_completion",
                                                  [], usage=_usage(self.job, msg)))
                    break
                elif isinstance(msg, Failed):
                    outcome = msg.error.status
                    yield _sse(msg.error.body())
                    break
                else:  # client gone
                    return
                msg = await _next(self.job, request)
            yield _sse("[DONE]")
        finally:
            # Also reached when the server stops the generator because the client hung up mid-stream.
            self.metrics.request_done("cancelled" if outcome is None else outcome)
            self.job.cancelled.set()  # no-op when finished; frees the row when the client went away


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (before it is all read)."""
    def too_large(size: str) -> APIError:
        return APIError(413, f"the request body is {size} bytes; this server takes at most {limit} bytes "
                        "(--max-body-bytes)", code="request_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _complete(server: Server, request: Request, parse) -> Response:
    raw = await _body(request, server.config.max_body_bytes)
    # Parsing a few MB of JSON takes tens of ms: off the event loop, like tokenising.
    req = await asyncio.get_running_loop().run_in_executor(server.tokenising, lambda: parse(parse_json(raw)))
    job = await server.make_job(req)
    server.scheduler.submit(job)
    try:
        # Wait for the first result before answering, so a failure is still a proper error status.
        msg = await _next(job, request)
        if msg is None:
            server.metrics.request_done("cancelled")
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        if isinstance(msg, Failed):
            raise msg.error
        resp = _Responder(server, req, job)
        if req.stream:
            sse = resp.events(msg, request)
            job = None  # the stream owns the job from here (and cancels it when it ends)
            return StreamingResponse(sse, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while isinstance(msg, Delta):  # the final message carries the whole text
            msg = await _next(job, request)
        if msg is None:
            server.metrics.request_done("cancelled")
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        if isinstance(msg, Failed):
            raise msg.error
        server.metrics.request_done(200)
        return JSONResponse(resp.full(msg.text, msg))
    finally:
        if job is not None:
            job.cancelled.set()  # finished, failed or abandoned: the worker drops this row at its next step


def create_app(model, config: ServerConfig | None = None, *, worker_thread: bool = True) -> FastAPI:
    """The app over an `exitspec.load()`ed model; the decode worker runs while the app does: on a
    thread the app starts, or (worker_thread=False) in whichever thread calls
    `app.state.server.scheduler.run()` - `exitspec serve` runs it on the thread that loaded the model
    (scheduler.py says why)."""
    server = Server(model, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker_thread:
            server.scheduler.start()
        yield
        # uvicorn has let running streams finish (up to its graceful-shutdown timeout); whatever is
        # left gets a 503 from the scheduler, and the tokenising thread stops.
        server.scheduler.close()
        server.tokenising.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="exitspec", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        server.metrics.request_done(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                     code=code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error",
                                     code="internal_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        s = server.scheduler
        return {"status": "ok", "model": server.name, "strategy": server.config.strategy,
                "weights": server.model.lm.weights, "heads": server.model.heads is not None,
                "waiting": s.waiting, "running": s.running, "completed": s.completed, "cancelled": s.cancelled}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "exitspec"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id not in (server.name, server.model.source):
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(server, request, parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(server, request, parse_completion)

    return app
