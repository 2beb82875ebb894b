"""The server's scheduler in process: which waiting requests share a batch, and in what order."""

from __future__ import annotations

import asyncio

import pytest

import exitspec
from conftest import tiny_loaded
from exitspec.server.protocol import APIError
from exitspec.server.scheduler import DecodeSettings, Delta, Finished, Job, Scheduler

GREEDY = DecodeSettings(strategy="vanilla", options_json="{}", temperature=0.0, top_p=1.0, seed=None, stop=())


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded("llama", layers=2)


def job(loop, settings=GREEDY, prompt_len=5, max_tokens=8) -> Job:
    return Job(prompt_ids=list(range(1, prompt_len + 1)), max_tokens=max_tokens, settings=settings,
               extra_positions=0, loop=loop)


def test_batches_take_compatible_jobs_oldest_first(tiny):
    loop = asyncio.new_event_loop()
    s = Scheduler(tiny, max_batch=3, max_queue=10)
    hot = DecodeSettings("vanilla", "{}", 0.7, 1.0, None, ())
    seeded = DecodeSettings("vanilla", "{}", 0.7, 1.0, 3, ())
    jobs = [job(loop), job(loop, hot), job(loop), job(loop, seeded), job(loop, seeded), job(loop), job(loop),
            job(loop, hot)]
    jobs[2].cancelled.set()  # a client that left while waiting is dropped, not decoded
    for j in jobs:
        s.submit(j)
    first = s._take_batch()
    assert first == [jobs[0], jobs[5], jobs[6]]  # greedy jobs, up to max_batch, skipping the cancelled one
    assert s._take_batch() == [jobs[1], jobs[7]]  # then the oldest remaining (sampled, unseeded) group
    assert s._take_batch() == [jobs[3]]  # seeded sampling decodes alone: its output must not depend on others
    assert s._take_batch() == [jobs[4]]
    assert s.waiting == 0
    loop.close()


def test_batch_respects_the_context_and_the_queue_limit(tiny):
    loop = asyncio.new_event_loop()
    ctx = tiny.lm.max_positions
    s = Scheduler(tiny, max_batch=8, max_queue=3)
    # Each fits alone, but a long prompt plus a long completion would not fit one batch's cache.
    a, b, c = job(loop, prompt_len=ctx - 20, max_tokens=10), job(loop, prompt_len=5, max_tokens=ctx - 50), job(loop)
    for j in (a, b, c):
        s.submit(j)
    with pytest.raises(APIError) as err:
        s.submit(job(loop))
    assert err.value.status == 503 and err.value.code == "server_overloaded"
    assert s._take_batch() == [a, c]
    assert s._take_batch() == [b]
    loop.close()


def test_worker_cuts_rows_to_their_own_max_tokens(tiny):
    """Rows of one batch with different max_tokens each get exactly their solo greedy answer."""

    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(tiny, max_batch=4)
        stop = DecodeSettings("vanilla", "{}", 0.0, 1.0, None, ("\x7f",))  # a stop string holds text back
        jobs = [job(loop, stop, prompt_len=3, max_tokens=4), job(loop, stop, prompt_len=7, max_tokens=9)]
        for j in jobs:
            s.submit(j)
        s.start()
        out = []
        for j in jobs:
            deltas = []
            while not isinstance(msg := await j.queue.get(), Finished):
                assert isinstance(msg, Delta)
                deltas.append(msg.text)
            out.append(("".join(deltas), msg))
        s.close()
        return jobs, out

    jobs, out = asyncio.run(main())
    for j, (streamed, fin) in zip(jobs, out, strict=True):
        ref = exitspec.generate(tiny, None, prompt_ids=[j.prompt_ids], max_new_tokens=j.max_tokens)
        assert streamed == fin.text == ref.text
        assert fin.completion_tokens == len(ref.token_ids[0]) and fin.stats["batch_size"] == 2
