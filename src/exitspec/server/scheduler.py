"""The decode scheduler: one worker thread runs every decode; compatible waiting requests share a batch.

Why one thread: torch already uses every core for one forward pass, so two decodes in parallel
would only fight for them; and the event loop must never run torch (a 100 ms step would stall
every other connection). The HTTP handlers `submit()` a `Job` and read its results from an
asyncio queue that the worker fills with `loop.call_soon_threadsafe`.

Batching: when the worker is free it takes the oldest waiting job and every other waiting job that
can share its decode - same strategy, options, temperature, top_p and stop strings (the driver
applies one setting to the whole batch) - up to `max_batch` rows and the model's context. Jobs that
cannot join wait for the next round, oldest first, so nothing starves. A batch is fixed once it
starts (the driver cannot add rows to a running decode), so a request arriving mid-decode waits
for the current batch to finish.

Sampled requests with a `seed` never share a batch: a batch draws from one generator, so a seeded
request's output would depend on who else happened to be waiting.

Per-row max_tokens may differ inside a batch: the driver runs to the largest, and a row with a
smaller limit is cut here (its text re-decoded from its first `max_tokens` tokens, stop strings
re-applied). Cancellation: the driver has no way to drop one row of a running batch, so a cancelled
row (client gone) keeps decoding and its output is ignored; once every row of a batch is finished
or cancelled, the decode stops at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from exitspec.decoding.api import stream
from exitspec.decoding.driver import GenerationError, eos_ids_for
from exitspec.decoding.events import FinishEvent, TokenEvent
from exitspec.server.protocol import APIError

log = logging.getLogger("exitspec.server")
_unique = itertools.count()


@dataclass(frozen=True)
class DecodeSettings:
    """What every row of one batched decode must share."""

    strategy: str
    options_json: str  # the strategy options, as canonical JSON (hashable, comparable)
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def options(self) -> dict:
        return json.loads(self.options_json)

    def batch_key(self) -> tuple:
        if self.temperature > 0 and self.seed is not None:
            return (self, next(_unique))  # seeded sampling decodes alone (see module docstring)
        return (self,)


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

    def __post_init__(self):
        self.key = self.settings.batch_key()

    def put(self, msg: Delta | Finished | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, msg)
        except RuntimeError:
            self.cancelled.set()  # the event loop is gone (server shutting down)


class _Row:
    """One job's view of a batched decode: cuts its own max_tokens, ignores output once over."""

    def __init__(self, job: Job, tokenizer, eos: set[int], driver_limit: int, strategy: str, batch: int):
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.driver_limit = driver_limit
        self.ids: list[int] = []
        self.sent = ""  # text already sent to the client
        self.steps = 0
        self.accepted = 0  # tokens beyond the first of each step: accepted drafts for speculative strategies
        self.exits: Counter = Counter()
        self.finished = False
        self.first_token_at: float | None = None
        self.stats = {"strategy": strategy, "batch_size": batch}

    @property
    def over(self) -> bool:
        return self.finished or self.job.cancelled.is_set()

    def on_tokens(self, ev: TokenEvent, started: float) -> None:
        if self.over:
            return
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.steps += 1
        self.accepted += max(len(ev.token_ids) - 1, 0)
        self.ids.extend(ev.token_ids)
        self.exits.update(ev.exit_layers)
        limit = self.job.max_tokens
        if len(self.ids) >= limit and limit < self.driver_limit:
            self._cut(started)  # the driver would go on: this row's own limit is smaller
        elif ev.text:
            self.sent += ev.text
            self.job.put(Delta(ev.text))

    def on_finish(self, ev: FinishEvent, started: float) -> None:
        if not self.over:
            self._finish(ev.reason, ev.text, started)

    def _cut(self, started: float) -> None:
        ids = self.ids[: self.job.max_tokens]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.job.settings.stop) if i >= 0]
        if hits:
            reason, text = "stop", text[: min(hits)]
        else:
            reason = "eos" if ids[-1] in self.eos else "length"
        self.ids = ids
        self._finish(reason, text, started)

    def _finish(self, reason: str, text: str, started: float) -> None:
        self.finished = True
        rest = text[len(self.sent):] if text.startswith(self.sent) else ""
        if rest:
            self.job.put(Delta(rest))
        now = time.perf_counter()
        n = len(self.ids)
        self.stats.update(
            completion_tokens=n, steps=self.steps,
            tokens_per_step=round(n / self.steps, 3) if self.steps else 0.0,
            accepted_drafts=self.accepted,
            exit_histogram={str(k): v for k, v in sorted(self.exits.items())},
            queue_s=round(started - self.job.submitted_at, 4),
            time_to_first_token_s=round((self.first_token_at or now) - self.job.submitted_at, 4),
            decode_s=round(now - started, 4),
            tokens_per_s=round(n / (now - started), 2) if now > started else 0.0,
        )
        self.job.put(Finished("length" if reason == "length" else "stop", text, n, self.stats))


class Scheduler:
    def __init__(self, model, *, max_batch: int = 32, max_queue: int = 256):
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_positions = model.lm.max_positions
        self.eos = set(eos_ids_for(model.model, model.tokenizer))
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0  # rows in the batch being decoded
        self.completed = 0  # batches decoded
        self._thread = threading.Thread(target=self._work, name="exitspec-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise APIError(503, f"the server is busy ({len(self._waiting)} requests waiting); retry later",
                               type="server_error", code="server_overloaded")
            self._waiting.append(job)
            self._cond.notify()

    def _fits(self, batch: list[Job]) -> bool:
        longest = max(len(j.prompt_ids) for j in batch)
        most = max(j.max_tokens for j in batch)
        return longest + most + batch[0].extra_positions + 1 <= self.max_positions

    def _take_batch(self) -> list[Job]:
        """The oldest live job and the waiting jobs that can share its decode (lock held)."""
        batch: list[Job] = []
        for job in list(self._waiting):
            if job.cancelled.is_set():
                self._waiting.remove(job)
            elif not batch or (job.key == batch[0].key and len(batch) < self.max_batch
                               and self._fits([*batch, job])):
                batch.append(job)
                self._waiting.remove(job)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take_batch()
                self.running = len(batch)
            if batch:
                try:
                    self._decode(batch)
                finally:
                    self.running = 0
                    self.completed += 1

    def _decode(self, batch: list[Job]) -> None:
        s = batch[0].settings
        limit = max(j.max_tokens for j in batch)
        rows = [_Row(j, self.model.tokenizer, self.eos, limit, s.strategy, len(batch)) for j in batch]
        started = time.perf_counter()
        events = stream(self.model, None, prompt_ids=[j.prompt_ids for j in batch], strategy=s.strategy,
                        max_new_tokens=limit, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                        stop=list(s.stop), **s.options)
        try:
            for ev in events:
                if isinstance(ev, TokenEvent):
                    rows[ev.row].on_tokens(ev, started)
                elif isinstance(ev, FinishEvent):
                    rows[ev.row].on_finish(ev, started)
                if all(r.over for r in rows):
                    break  # every client has its answer or is gone: stop decoding now
        except GenerationError as err:  # settings the strategy refuses (validated options can still clash)
            self._fail(rows, APIError(400, str(err), param="exitspec", code="generation_error"))
        except Exception as err:  # a bug must fail these requests, not the server
            log.exception("decode failed")
            self._fail(rows, APIError(500, f"decoding failed: {type(err).__name__}: {err}", type="server_error",
                                      code="decode_failed"))
        finally:
            events.close()
        log.info("batch of %d decoded in %.2f s", len(batch), time.perf_counter() - started)

    @staticmethod
    def _fail(rows: list[_Row], error: APIError) -> None:
        for r in rows:
            if not r.over:
                r.finished = True
                r.job.put(Failed(error))
