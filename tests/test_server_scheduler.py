"""The server's scheduler in process: requests join the running batch at the next step, leave it at
once, wait (or are refused) beyond the limits, and each gets exactly its solo answer."""

from __future__ import annotations

import asyncio
import time

import pytest

import exitspec
from conftest import tiny_loaded
from exitspec.decoding.api import make_strategy
from exitspec.decoding.config import GenerationError
from exitspec.server.protocol import APIError
from exitspec.server.scheduler import DecodeSettings, Delta, Failed, Finished, Job, Scheduler

GREEDY = DecodeSettings(strategy="vanilla", options_json="{}", temperature=0.0, top_p=1.0, seed=None, stop=())


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded("llama", layers=2)


def job(loop, settings=GREEDY, prompt_len=5, max_tokens=8, first=1) -> Job:
    return Job(prompt_ids=list(range(first, first + prompt_len)), max_tokens=max_tokens, settings=settings,
               extra_positions=0, loop=loop)


async def collect(j: Job) -> tuple[str, Finished | Failed, list[float]]:
    """All of a job's text, its last message, and when each message arrived."""
    texts, times = [], []
    while True:
        msg = await j.queue.get()
        times.append(time.perf_counter())
        if isinstance(msg, Delta):
            texts.append(msg.text)
        else:
            return "".join(texts), msg, times


def solo(tiny, j: Job) -> str:
    s = j.settings
    return exitspec.generate(tiny, None, prompt_ids=[j.prompt_ids], max_new_tokens=j.max_tokens,
                             strategy=s.strategy, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                             stop=list(s.stop), **s.options).text


def test_a_request_arriving_mid_decode_joins_the_running_batch(tiny):
    """B arrives while A decodes: B's first token comes before A ends, and B ends first; both
    equal their solo answers (the stop string holds text back, B's max_tokens is smaller)."""

    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(tiny, max_batch=4, prefill_tokens=4)
        stop = DecodeSettings("vanilla", "{}", 0.0, 1.0, None, ("\x7f",))
        a, b = job(loop, stop, prompt_len=3, max_tokens=200), job(loop, stop, prompt_len=11, max_tokens=9, first=20)
        s.submit(a)
        s.start()
        first = await a.queue.get()
        assert isinstance(first, Delta)
        s.submit(b)
        (ta, fa, times_a), (tb, fb, times_b) = await asyncio.gather(collect(a), collect(b))
        s.close()
        return a, b, first.text + ta, fa, times_a, tb, fb, times_b

    a, b, ta, fa, times_a, tb, fb, times_b = asyncio.run(main())
    assert times_b[0] < times_a[-1] and times_b[-1] < times_a[-1]
    assert ta == fa.text == solo(tiny, a) and tb == fb.text == solo(tiny, b)
    assert fa.completion_tokens == 200 and fb.completion_tokens == 9
    assert fb.stats["batch_size"] == 2 and fa.stats["batch_size"] == 2


def test_a_cancelled_request_leaves_at_once(tiny):
    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(tiny, max_batch=4)
        a, b = job(loop, max_tokens=400), job(loop, max_tokens=60, first=30)
        s.submit(a)
        s.submit(b)
        s.start()
        assert isinstance(await a.queue.get(), Delta)
        deadline = time.monotonic() + 10
        while s.running != 2 and time.monotonic() < deadline:  # counted after each round of steps
            await asyncio.sleep(0.001)
        assert s.running == 2
        a.cancelled.set()
        while s.running != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        running_after = s.running
        text, fin, _ = await collect(b)
        s.close()
        return running_after, s.cancelled, b, text, fin

    running_after, cancelled, b, text, fin = asyncio.run(main())
    assert running_after == 1 and cancelled == 1  # A's row left while B kept decoding
    assert text == fin.text == solo(tiny, b)


def test_mixed_settings_and_strategies_each_give_their_solo_answer(tiny):
    """Greedy vanilla, greedy lookup, seeded sampling and seeded nucleus sampling at once (two engines
    stepped in turn; rows with their own settings): each answer equals its solo decode."""
    settings = [GREEDY, DecodeSettings("lookup", '{"draft_len": 2}', 0.0, 1.0, None, ()),
                DecodeSettings("vanilla", "{}", 1.0, 1.0, 7, ()), DecodeSettings("vanilla", "{}", 0.8, 0.9, 3, ()),
                DecodeSettings("lookup", '{"draft_len": 2}', 1.2, 1.0, 5, ())]

    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(tiny, max_batch=8)
        jobs = [job(loop, st, prompt_len=4 + i, max_tokens=10 + 3 * i, first=i + 1) for i, st in enumerate(settings)]
        for j in jobs:
            s.submit(j)
        s.start()
        out = await asyncio.gather(*(collect(j) for j in jobs))
        s.close()
        return jobs, out

    jobs, out = asyncio.run(main())
    for j, (text, fin, _) in zip(jobs, out, strict=True):
        assert isinstance(fin, Finished) and text == fin.text == solo(tiny, j), j.settings
    assert max(fin.stats["batch_size"] for _, fin, _ in out) >= 2


def test_the_queue_limit_refuses_with_retry_after_and_shutdown_fails_what_is_left(tiny):
    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(tiny, max_batch=1, max_queue=2)
        jobs = [job(loop), job(loop)]
        for j in jobs:
            s.submit(j)
        with pytest.raises(APIError) as err:
            s.submit(job(loop))
        assert err.value.status == 503 and err.value.code == "server_overloaded"
        assert int(err.value.headers["Retry-After"]) >= 1 and "--max-queue 2" in err.value.message
        s.start()
        s.close()  # before the worker took them, or while it decodes them: each job hears back
        msgs = [await asyncio.wait_for(collect(j), 10) for j in jobs]
        with pytest.raises(APIError) as err:
            s.submit(job(loop))
        assert err.value.code == "shutting_down"
        return msgs

    for _, last, _ in asyncio.run(main()):
        assert isinstance(last, Finished) or (isinstance(last, Failed) and last.error.status == 503)


def test_torch_work_runs_on_the_worker_thread_and_the_worker_can_be_the_callers(tiny):
    """`call()` runs work between steps on the worker (its result or its exception comes back); the
    worker loop can run in the thread that loaded the model (`run()`, as `exitspec serve` does), and
    close() ends it and refuses later calls with a 503."""
    import threading

    s = Scheduler(tiny, max_batch=2)
    caller = threading.current_thread()
    done: list[str] = []

    def client() -> None:
        try:
            assert s.call(threading.current_thread).result(timeout=30) is caller
            with pytest.raises(GenerationError, match="unknown strategy"):
                s.call(lambda: make_strategy("no such strategy", tiny)).result(timeout=30)
            done.append("ok")
        finally:
            s.close()

    t = threading.Thread(target=client)
    t.start()
    s.run()  # returns once the client thread closed the scheduler
    t.join()
    assert done == ["ok"]
    with pytest.raises(APIError, match="shutting down"):
        s.call(lambda: None).result(timeout=1)


def test_a_stream_interval_sends_fewer_larger_deltas_that_add_up_to_the_answer(tiny):
    """With --stream-interval-ms the worker holds text back between hand-offs; the deltas still
    join to the solo answer, the first one is not held back, and the rest come no more often than
    the interval allows (plus the flush before the finish)."""

    def run(interval_s: float):
        async def main():
            s = Scheduler(tiny, max_batch=2, stream_interval_s=interval_s)
            j = job(asyncio.get_running_loop(), max_tokens=60)
            s.submit(j)
            s.start()
            deltas = []
            while not isinstance(msg := await j.queue.get(), (Finished, Failed)):
                deltas.append(msg.text)
            s.close()
            return j, deltas, msg

        return asyncio.run(main())

    j, every_step, done = run(0.0)
    assert "".join(every_step) == done.text == solo(tiny, j)
    j, held, done = run(3600.0)  # nothing but the first step's text and the final flush
    assert "".join(held) == done.text == solo(tiny, j)
    assert len(held) == 2 < len(every_step)


def test_text_queued_behind_a_delta_leaves_as_one_chunk_and_the_finish_stays_next():
    """The event loop's side of coalescing: Deltas that queued up while it was busy join the one in
    hand; the Finished behind them is handed back, not lost or merged."""
    from exitspec.server.app import _queued_text

    async def main():
        j = job(asyncio.get_running_loop())
        done = Finished("stop", "abc", 3, {})
        for msg in (Delta("b"), Delta("c"), done, Delta("never")):
            j.queue.put_nowait(msg)
        first = _queued_text(j)
        return first, j.queue.qsize(), done

    (text, after), left, done = asyncio.run(main())
    assert text == "bc" and after is done and left == 1
