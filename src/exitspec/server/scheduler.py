"""The decode scheduler: one worker thread steps the decode engines; requests join and leave at every step.

Why one thread: torch already uses every core for one forward pass, so two decodes in parallel
would only fight for them; and the event loop must never run torch (a 100 ms step would stall
every other connection). The HTTP handlers `submit()` a `Job` and read its results from an
asyncio queue that the worker fills with `loop.call_soon_threadsafe`.

Why the worker should be the thread that loaded the model, and the only one that runs torch
(`exitspec serve` runs it on the main thread, uvicorn beside it; other torch work such as
building a strategy to validate a request goes through `call()`): OpenMP keeps one pool of
worker threads per thread that starts parallel work, and once libgomp manages more threads than
there are cores it stops spinning between parallel regions and puts its workers to sleep, so every
one of the hundreds of kernel calls per token pays a futex wake-up. On 2 cores that cost a third of
the decode speed (benchmarks/load_test.md measures one stream against the in-process loop).

Continuous batching: each (strategy, options) pair has one `Engine` (decoding/engine.py), whose
running batch a new request joins at its next step (its prompt prefilled in chunks between
steps) and which a finished or cancelled request leaves at once. Rows of one engine keep their own
temperature, top_p, seed, stop strings and max_tokens. Requests for different strategies run in
different engines, stepped in turn, so each still gets what it gets alone. Jobs wait here, oldest
first, while `max_batch` rows (over every engine) are taken; beyond `max_queue` waiting, submit()
refuses with 503 and a Retry-After.

Cancellation (a client gone): the worker checks every live job before each round of steps and
cancels its row, which then leaves its engine before that engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from exitspec.decoding.api import make_strategy
from exitspec.decoding.config import GenerateConfig, GenerationError
from exitspec.decoding.engine import Engine
from exitspec.decoding.events import FinishEvent, RowStats, TokenEvent
from exitspec.decoding.sampling import SamplingParams
from exitspec.server.metrics import Metrics
from exitspec.server.protocol import APIError

log = logging.getLogger("exitspec.server")
IDLE_ENGINES = 4  # engines (strategy + options) kept without rows; older idle ones are dropped


@dataclass(frozen=True)
class DecodeSettings:
    """How one request decodes: the engine it joins (strategy, options) and its own row settings."""

    strategy: str
    options_json: str  # the strategy options, as canonical JSON (hashable, comparable)
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def options(self) -> dict:
        return json.loads(self.options_json)

    @property
    def engine_key(self) -> tuple[str, str]:
        return self.strategy, self.options_json


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # OpenAI's finish_reason: "stop" or "length"
    text: str  # the whole completion
    completion_tokens: int
    stats: dict  # the "exitspec" extension of the response


@dataclass
class Failed:
    error: APIError


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    settings: DecodeSettings
    extra_positions: int  # cache slots the strategy needs beyond prompt + max_tokens
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)

    def put(self, msg: Delta | Finished | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, msg)
        except RuntimeError:
            self.cancelled.set()  # the event loop is gone (server shutting down)


class _Live:
    """A job with a row in an engine: what it has been sent, and its timings."""

    def __init__(self, job: Job, engine: Engine, row: int):
        self.job, self.engine, self.row = job, engine, row
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.cancel_sent = False
        self.unsent = ""  # text decoded but not yet handed to the event loop (stream interval)
        self.sent_at = float("-inf")


class Scheduler:
    def __init__(self, model, *, max_batch: int = 32, max_queue: int = 256, prefill_tokens: int | None = 256,
                 metrics: Metrics | None = None, stream_interval_s: float = 0.0):
        self.model = model
        # A stream's new text is handed to the event loop at most this often (0: every step). Each
        # hand-off wakes the event loop thread, and each chunk is JSON here and a parse in the client:
        # on a 2-core machine that work preempts the decode threads' OpenMP workers mid-step.
        self.stream_interval_s = stream_interval_s
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.metrics = metrics
        self._waiting: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # torch work for the worker
        self._cond = threading.Condition()
        self._closed = False
        self._engines: OrderedDict[tuple[str, str], Engine] = OrderedDict()
        self._live: dict[tuple[int, int], _Live] = {}  # (id(engine), row) -> job
        self._engine_waiting = self._running = 0
        self.completed = 0  # requests that finished (eos, stop, length)
        self.cancelled = 0  # requests whose client left before they finished
        self._thread = threading.Thread(target=self._work, name="exitspec-decode", daemon=True)

    # --- the handlers' side -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the worker on a thread of its own (the app's lifespan does, unless told it runs elsewhere)."""
        self._thread.start()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the worker thread between two rounds of steps (torch work stays on one thread)."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                future.set_exception(APIError(503, "the server is shutting down", type="server_error",
                                              code="shutting_down", headers={"Retry-After": "5"}))
                return future
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop: waiting and running requests get a 503 (their streams end with it), the worker exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests not yet decoding: queued here or waiting in an engine for their prefill."""
        return len(self._waiting) + self._engine_waiting

    @property
    def running(self) -> int:
        """Rows in an engine's running batch or prefill (as of the worker's last round)."""
        return self._running

    def _count(self) -> None:
        """Refresh the counts other threads read (they must not walk the engines while the worker
        changes them)."""
        engines = self._engines.values()
        self._engine_waiting = sum(len(e.waiting) for e in engines)
        self._running = sum(len(e.rows) + (len(e.prefill.rows) if e.prefill else 0) for e in engines)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one batch of the default length, at least 1."""
        return max(1, min(60, len(self._waiting) // max(self.max_batch, 1) + 1))

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down; retry on another instance or later",
                               type="server_error", code="shutting_down", headers={"Retry-After": "5"})
            if len(self._waiting) >= self.max_queue:
                raise APIError(503, f"the server is busy ({len(self._waiting)} requests waiting, the limit is "
                               f"--max-queue {self.max_queue}); retry later", type="server_error",
                               code="server_overloaded", headers={"Retry-After": str(self.retry_after())})
            self._waiting.append(job)
            self._cond.notify()

    # --- the worker ---------------------------------------------------------------------------------
    def run(self) -> None:
        """The worker loop, in the calling thread, until close()."""
        self._work()

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while (not self._closed and not self._waiting and not self._calls
                           and not any(e.busy for e in self._engines.values())):
                        self._cond.wait()
                    if self._closed:
                        break
                    jobs = self._take()
                    calls, self._calls = list(self._calls), deque()
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except Exception as err:  # the caller gets it; the worker goes on
                            future.set_exception(err)
                for job in jobs:
                    self._place(job)
                self._cancel_gone()
                for key, engine in list(self._engines.items()):
                    if engine.busy:
                        self._step(key, engine)
                self._drop_idle_engines()
                self._count()
        finally:
            self._shutdown()

    def _take(self) -> list[Job]:
        """Waiting jobs that fit under max_batch rows, oldest first; cancelled ones dropped (lock held)."""
        room = self.max_batch - sum(e.size for e in self._engines.values())
        out: list[Job] = []
        while self._waiting and len(out) < room:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                self.cancelled += 1
                continue
            out.append(job)
        return out

    def _engine(self, s: DecodeSettings) -> Engine:
        key = s.engine_key
        engine = self._engines.get(key)
        if engine is None:
            strategy = make_strategy(s.strategy, self.model, **s.options)
            engine = Engine(self.model.lm, self.model.tokenizer, strategy, heads=self.model.heads,
                            max_rows=self.max_batch, prefill_tokens=self.prefill_tokens)
            self._engines[key] = engine
        self._engines.move_to_end(key)
        return engine

    def _place(self, job: Job) -> None:
        s = job.settings
        try:
            engine = self._engine(s)
            sampling = SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed)
            row = engine.add(job.prompt_ids, GenerateConfig(max_new_tokens=job.max_tokens, sampling=sampling,
                                                            stop=list(s.stop)))
        except (GenerationError, ValueError, TypeError) as err:  # validated already; a clash still says why
            self._fail_job(job, APIError(400, str(err), param="exitspec", code="generation_error"))
            return
        self._live[(id(engine), row)] = _Live(job, engine, row)
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _cancel_gone(self) -> None:
        for live in self._live.values():
            if live.job.cancelled.is_set() and not live.cancel_sent:
                live.engine.cancel(live.row)
                live.cancel_sent = True

    def _step(self, key: tuple[str, str], engine: Engine) -> None:
        try:
            events = engine.step()
        except Exception as err:  # a bug must fail this engine's requests, not the server
            log.exception("decode failed")
            error = APIError(500, f"decoding failed: {type(err).__name__}: {err}", type="server_error",
                             code="decode_failed")
            for k in [k for k, live in self._live.items() if live.engine is engine]:
                self._fail_job(self._live.pop(k).job, error)
            del self._engines[key]  # its cache and strategy state are suspect: start afresh
            return
        if self.metrics and any(isinstance(ev, TokenEvent) for ev in events):  # a decode step ran
            self.metrics.batch_size.observe(engine.last_batch)
        now = time.perf_counter()
        for ev in events:
            live = self._live.get((id(engine), ev.row))
            if live is None:
                continue
            if isinstance(ev, TokenEvent):
                self._on_tokens(live, ev, now)
            elif isinstance(ev, FinishEvent):
                del self._live[(id(engine), ev.row)]
                self._on_finish(live, ev, now)

    def _on_tokens(self, live: _Live, ev: TokenEvent, now: float) -> None:
        m = self.metrics
        if m:
            m.generation_tokens.inc(len(ev.token_ids))
            if live.last_token_at is None:
                m.ttft.observe(now - live.job.submitted_at)
            elif ev.token_ids:
                gap = (now - live.last_token_at) / len(ev.token_ids)
                for _ in ev.token_ids:
                    m.inter_token.observe(gap)
        live.first_token_at = live.first_token_at or now
        live.last_token_at = now
        if ev.text and not live.job.cancelled.is_set():
            live.unsent += ev.text
            if now - live.sent_at >= self.stream_interval_s:
                self._send(live, now)

    @staticmethod
    def _send(live: _Live, now: float) -> None:
        if live.unsent:
            live.job.put(Delta(live.unsent))
            live.unsent, live.sent_at = "", now

    def _on_finish(self, live: _Live, ev: FinishEvent, now: float) -> None:
        rs = ev.stats or RowStats()
        if self.metrics:
            for n in rs.accept_lengths:
                self.metrics.accepted_drafts.observe(n)
        if ev.reason == "cancelled":
            self.cancelled += 1
            return
        self.completed += 1
        self._send(live, now)  # the text held back by the stream interval goes before the finish
        job, n = live.job, len(ev.token_ids)
        stats = {
            "strategy": job.settings.strategy, "batch_size": rs.batch_peak, "completion_tokens": n,
            "steps": rs.steps, "tokens_per_step": round(n / rs.steps, 3) if rs.steps else 0.0,
            "accepted_drafts": rs.accepted,
            "exit_histogram": {str(k): v for k, v in sorted(rs.exit_layers.items())},
            "queue_s": round(live.started - job.submitted_at, 4),
            "time_to_first_token_s": round((live.first_token_at or now) - job.submitted_at, 4),
            "decode_s": round(now - live.started, 4),
            "tokens_per_s": round(n / (now - live.started), 2) if now > live.started else 0.0,
        }
        job.put(Finished("length" if ev.reason == "length" else "stop", ev.text, n, stats))

    def _fail_job(self, job: Job, error: APIError) -> None:
        job.put(Failed(error))

    def _drop_idle_engines(self) -> None:
        idle = [k for k, e in self._engines.items() if not e.busy]
        for k in idle[: max(0, len(idle) - IDLE_ENGINES)]:
            del self._engines[k]

    def _shutdown(self) -> None:
        """The worker's last act: every request still here gets a 503 instead of hanging."""
        error = APIError(503, "the server is shutting down; the request was not completed", type="server_error",
                         code="shutting_down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = list(self._calls), deque()
        for _, future in calls:
            future.cancel()
        for job in waiting:
            self._fail_job(job, error)
        for live in self._live.values():
            self._fail_job(live.job, error)
        self._live.clear()
        self._engines.clear()
        self._count()
