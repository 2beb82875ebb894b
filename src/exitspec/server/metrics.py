"""The server's Prometheus metrics (`GET /metrics`, text exposition format), in a registry of its own.

A registry per server rather than prometheus_client's global one: several apps in one process
(tests) would otherwise collide on metric names. The decode worker thread observes most of them;
prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: a first token comes after a prefill (tens of ms to seconds); steps take ms on a CPU.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_DRAFT_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64)


class Metrics:
    def __init__(self, waiting: Callable[[], float], running: Callable[[], float]):
        """`waiting` / `running`: read when scraped (requests queued, rows decoding)."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("exitspec_requests", "Completion requests by outcome: the HTTP status "
                                "answered, or 'cancelled' when the client left first", ["status"], registry=r)
        self.prompt_tokens = Counter("exitspec_prompt_tokens", "Prompt tokens admitted for decoding", registry=r)
        self.generation_tokens = Counter("exitspec_generation_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("exitspec_queue_length", "Requests waiting for a row", registry=r)
        self.queue_length.set_function(waiting)
        self.running_rows = Gauge("exitspec_running_rows", "Rows being prefilled or decoded", registry=r)
        self.running_rows.set_function(running)
        self.batch_size = Histogram("exitspec_batch_size", "Rows in each decode step", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.ttft = Histogram("exitspec_time_to_first_token_seconds", "From a request's arrival to its first "
                              "token", buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("exitspec_inter_token_latency_seconds", "Time between a row's tokens "
                                     "(a step's time shared by the tokens it gave)", buckets=_ITL_BUCKETS, registry=r)
        self.accepted_drafts = Histogram("exitspec_accepted_drafts_per_verification", "Draft tokens accepted by "
                                         "each verification (speculative strategies)", buckets=_DRAFT_BUCKETS,
                                         registry=r)

    def request_done(self, status: int | str) -> None:
        self.requests.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
