"""The OpenAI-compatible server, end to end: a real `exitspec serve` process on loopback, driven by the
official `openai` client (and raw httpx for malformed requests).

The fast tests serve a tiny random llama saved to a temporary folder; one slow test serves the real
default model. Greedy output through the server must equal exitspec's own decoding token for token.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import exitspec
from exitspec.decoding.api import encode_prompt
from helpers_server import REPO, ServerProcess, cli_env, one_torch_thread, save_tiny_model

MAX = 12  # completion tokens in most tests: the tiny model decodes ~10-50 tokens/s on a loaded CPU


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return exitspec.load(str(tiny_dir))


@pytest.fixture(scope="module")
def server(tiny_dir):
    srv = ServerProcess("--model", str(tiny_dir), "--max-batch", "8", "--max-body-bytes", "65536")
    yield srv
    out = srv.stop()
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_health_and_models(server, client):
    h = httpx.get(server.base + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and h["strategy"] == "vanilla"
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_greedy_equals_generate_cli(client, tiny_dir, tiny):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=MAX, temperature=0)
    cli = subprocess.run([sys.executable, "-m", "exitspec.cli", "generate", "Hello", "--model", str(tiny_dir),
                          "--max-new-tokens", str(MAX), "--threads", "1"],
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert r.choices[0].message.content == cli.stdout[:-1]  # generate ends its output with one newline
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    ref = exitspec.generate(tiny, [{"role": "user", "content": "Hello"}], max_new_tokens=MAX)
    assert r.choices[0].message.content == ref.text
    prompt_len = len(encode_prompt(tiny.tokenizer, "Hello"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_len, MAX, prompt_len + MAX)
    ext = r.model_extra["exitspec"]  # the extension field standard clients carry along untouched
    assert ext["strategy"] == "vanilla" and ext["completion_tokens"] == MAX and ext["tokens_per_s"] > 0
    assert ext["exit_histogram"] == {str(tiny.lm.num_layers): MAX} and ext["accepted_drafts"] == 0


def test_completion_raw_prompt_and_token_ids(client, tiny):
    ref = exitspec.generate(tiny, "The cat", chat=False, max_new_tokens=MAX)
    r = client.completions.create(model="tiny", prompt="The cat", max_tokens=MAX, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(tiny.tokenizer("The cat")["input_ids"])
    ids = tiny.tokenizer("The cat")["input_ids"]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=MAX, temperature=0)
    assert r2.choices[0].text == ref.text


def test_streams_join_to_the_full_answer(client, tiny):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    ref = exitspec.generate(tiny, msgs, max_new_tokens=MAX)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["exitspec"]["completion_tokens"] == MAX
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX
    assert all(c.usage is None for c in chunks[:-1])

    raw = list(client.completions.create(model="tiny", prompt="Once", max_tokens=MAX, temperature=0, stream=True))
    ref = exitspec.generate(tiny, "Once", chat=False, max_new_tokens=MAX)  # this one ends at EOS
    assert "".join(c.choices[0].text for c in raw) == ref.text
    assert raw[-1].choices[0].finish_reason == {"length": "length"}.get(ref.finish_reasons[0], "stop")
    assert raw[-1].usage is None


def test_stop_strings_and_seeded_sampling(client, tiny):
    prompt = next(p for p in ("abc", "The cat", "xyz", "hello", "1234")  # one that runs to max_tokens
                  if exitspec.generate(tiny, p, chat=False, max_new_tokens=MAX).finish_reasons[0] == "length")
    full = exitspec.generate(tiny, prompt, chat=False, max_new_tokens=MAX).text
    stop = full[4:6]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX, temperature=0, stop=stop)
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX, temperature=0,
                                         stop=[stop, "\x7f"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]

    kw = dict(model="tiny", prompt="abc", max_tokens=MAX, temperature=1.5, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b == exitspec.generate(tiny, "abc", chat=False, max_new_tokens=MAX, temperature=1.5,
                                       top_p=0.9, seed=7).text


def test_strategy_extension(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       temperature=0, extra_body={"exitspec": {"strategy": "vanilla"}})
    assert r.model_extra["exitspec"]["strategy"] == "vanilla"
    # A lossless strategy with options, through the same extension: the same text as vanilla.
    msgs = [{"role": "user", "content": "abc abc abc abc"}]
    ref = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                       extra_body={"exitspec": {"strategy": "lookup", "options": {"draft_len": 2}}})
    assert r.model_extra["exitspec"]["strategy"] == "lookup"
    assert r.choices[0].message.content == ref.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body={"exitspec": {"strategy": "no-such-strategy"}})
    assert "unknown strategy 'no-such-strategy'" in err.value.message and "vanilla" in err.value.message


def _chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


BAD_REQUESTS = [
    # (body, status, code, param)
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    ({"model": "tiny"}, 400, "missing_messages", "messages"),
    (_chat(messages=[]), 400, "missing_messages", "messages"),
    (_chat(messages=[{"role": "user"}]), 400, "invalid_value", "messages[0].content"),
    (_chat(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_value", "messages[0].role"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "unsupported", "messages[0].content"),
    (_chat(model="gpt-4o"), 404, "model_not_found", "model"),
    (_chat(model=None), 400, "missing_model", "model"),
    (_chat(temperature=2.5), 400, "invalid_value", "temperature"),
    (_chat(temperature="hot"), 400, "invalid_value", "temperature"),
    (_chat(top_p=0), 400, "invalid_value", "top_p"),
    (_chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    (_chat(max_tokens=-3), 400, "invalid_value", "max_tokens"),
    (_chat(max_tokens=2.5), 400, "invalid_value", "max_tokens"),
    (_chat(max_tokens=5, max_completion_tokens=6), 400, "invalid_value", "max_completion_tokens"),
    (_chat(max_tokens=100_000), 400, "context_length_exceeded", "max_tokens"),
    (_chat(messages=[{"role": "user", "content": "x" * 600}], max_tokens=None), 400, "context_length_exceeded",
     "messages"),
    (_chat(n=2), 400, "unsupported", "n"),
    (_chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported", "tools"),
    (_chat(logprobs=True), 400, "unsupported", "logprobs"),
    (_chat(frequency_penalty=0.5), 400, "unsupported", "frequency_penalty"),
    (_chat(stop=["ok", ""]), 400, "invalid_value", "stop"),
    (_chat(stream_options={"include_usage": True}), 400, "invalid_value", "stream_options"),
    (_chat(exitspec={"strategy": 3}), 400, "invalid_value", "exitspec.strategy"),
    (_chat(exitspec={"strategy": "vanilla", "options": {"x": 1}, "extra": 1}), 400, "invalid_value", "exitspec"),
    (_chat(frobnicate=1), 400, "unknown_parameter", "frobnicate"),
    # issue 21's list: never a 500 for input, always the field named
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800 x"}]}', 400, "invalid_value",
     "messages[0].content"),
    (b"[" * 30_000 + b"]" * 30_000, 400, "invalid_json", None),  # 30,000 levels, under the body cap
    (_chat(seed=2**64, temperature=0.7), 400, "invalid_value", "seed"),
    (_chat(messages=[{"role": "user", "content": "x" * 600}], max_tokens=4), 400, "context_length_exceeded",
     "messages"),
    (_chat(exitspec={"strategy": "vanilla", "options": {"draft_len": 2}}), 400, "invalid_strategy", "exitspec"),
    (_chat(exitspec={"strategy": "lookup", "options": {"draft_len": 2.7}}), 400, "invalid_strategy", "exitspec"),
    (_chat(exitspec={"strategy": "self-spec", "options": {"exit_layer": 8.5}}), 400, "invalid_strategy", "exitspec"),
    (_chat(exitspec={"strategy": "self-spec", "options": {"exit_layer": True}}), 400, "invalid_strategy",
     "exitspec"),
    (_chat(exitspec={"strategy": "self-spec"}), 400, "invalid_strategy", "exitspec"),
]


@pytest.mark.parametrize("body,status,code,param", BAD_REQUESTS, ids=[f"{i}-{b[2]}" for i, b in
                                                                     enumerate(BAD_REQUESTS)])
def test_bad_chat_requests_get_openai_errors(server, body, status, code, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": {k: v for k, v in body.items() if v is not None}}
    r = httpx.post(server.base + "/v1/chat/completions", headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"]) == (code, param), err
    assert err["type"] == "invalid_request_error"


def test_bad_request_messages_name_what_to_change(server):
    post = lambda body, **kw: httpx.post(server.base + "/v1/chat/completions", json=_chat(**body), **kw).json()
    assert post({"n": 2})["error"]["message"] == ("n=2 (several choices per request) is not supported by the "
                                                  "exitspec server; send n=1, or one request per choice")
    assert "seed" in post({"seed": 2**64, "temperature": 0.7})["error"]["message"]
    for opts in ({"exit_layer": 8.5}, {"exit_layer": True}, {"exit_layer": [1, 2]}, {"draft_len": 2.7}):
        msg = post({"exitspec": {"strategy": "self-spec", "options": opts}})["error"]["message"]
        assert "must be an integer" in msg and repr(next(iter(opts.values()))) in msg, msg
    assert "no option(s) ['draft_len']" in post({"exitspec": {"strategy": "vanilla", "options": {"draft_len": 2}}}
                                                )["error"]["message"]
    assert "--heads" in post({"exitspec": {"strategy": "self-spec"}})["error"]["message"]
    big = httpx.post(server.base + "/v1/chat/completions", content=b" " * 70_000,
                     headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "65536 bytes" in big.json()["error"]["message"]
    assert httpx.post(server.base + "/v1/completions", json={"model": "tiny", "prompt": [1, 10_000]}
                      ).json()["error"]["code"] == "invalid_value"
    assert httpx.get(server.base + "/health").json()["status"] == "ok"


def test_bad_completion_requests_and_routes(server, client):
    post = lambda body: httpx.post(server.base + "/v1/completions", json=body)
    assert post({"model": "tiny"}).json()["error"]["code"] == "missing_prompt"
    assert post({"model": "tiny", "prompt": ["a", "b"]}).json()["error"]["param"] == "prompt"
    assert post({"model": "tiny", "prompt": [1, 10_000]}).status_code == 400
    assert post({"model": "tiny", "prompt": "a", "echo": True}).json()["error"]["code"] == "unsupported"
    assert post({"model": "tiny", "prompt": "a", "best_of": 3}).json()["error"]["param"] == "best_of"
    assert httpx.get(server.base + "/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(server.base + "/v1/chat/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=-1)
    assert server.alive and httpx.get(server.base + "/health").json()["status"] == "ok"


def test_concurrent_requests_share_a_batch_and_match_solo_decoding(server, client, tiny):
    """Requests arriving together are decoded as one batch; each still gets exactly its solo answer,
    including rows whose max_tokens is smaller than the batch's (cut by the scheduler)."""
    prompts = ["red", "green apples", "blue", "a much longer prompt than the others"]
    limits = [MAX, MAX - 4, MAX, 5]
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=limits[i],
                                               temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        ref = exitspec.generate(tiny, p, chat=False, max_new_tokens=limits[i])
        assert results[i].choices[0].text == ref.text, i
        assert results[i].usage.completion_tokens == limits[i]
        assert results[i].choices[0].finish_reason == "length"
    assert max(r.model_extra["exitspec"]["batch_size"] for r in results.values()) > 1


def _metric(server, name: str) -> float:
    """One sample of GET /metrics ('name{labels}' as printed), 0 when absent."""
    for line in httpx.get(server.base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_disconnect_mid_stream_frees_the_row_at_once(server, client, tiny):
    cancelled = _metric(server, 'exitspec_requests_total{status="cancelled"}')
    before = httpx.get(server.base + "/health").json()["cancelled"]
    with httpx.stream("POST", server.base + "/v1/completions",
                      json={"model": "tiny", "prompt": "~~~", "max_tokens": 400, "temperature": 0,
                            "stream": True}) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # hang up after a few tokens
    # The row leaves the batch at the next step, long before its EOS.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        h = httpx.get(server.base + "/health").json()
        if h["running"] == 0 and h["cancelled"] > before:
            break
        time.sleep(0.05)
    assert h["running"] == 0 and h["cancelled"] == before + 1, h
    assert _metric(server, "exitspec_running_rows") == 0
    assert _metric(server, 'exitspec_requests_total{status="cancelled"}') == cancelled + 1
    r = client.completions.create(model="tiny", prompt="next", max_tokens=4, temperature=0)
    assert r.choices[0].text == exitspec.generate(tiny, "next", chat=False, max_new_tokens=4).text


def test_a_request_arriving_mid_decode_gets_its_first_token_before_the_first_finishes(server, client, tiny):
    long_prompt = "~~~"  # the tiny model writes 213 tokens before its EOS
    events: dict[str, list[float]] = {"long": [], "short": []}
    texts = {"long": "", "short": ""}

    def run(name: str, prompt: str, n: int) -> None:
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                               stream=True):
            events[name].append(time.monotonic())
            texts[name] += chunk.choices[0].text

    first = threading.Thread(target=run, args=("long", long_prompt, 300))
    first.start()
    while not events["long"]:
        time.sleep(0.01)
    run("short", "hi", 6)
    first.join()
    assert events["short"][0] < events["long"][-1] and events["short"][-1] < events["long"][-1]
    assert texts["short"] == exitspec.generate(tiny, "hi", chat=False, max_new_tokens=6).text
    assert texts["long"] == exitspec.generate(tiny, long_prompt, chat=False, max_new_tokens=300).text


def test_mixed_temperatures_and_strategies_in_one_batch_give_their_solo_answers(server, client, tiny):
    asks = [dict(prompt="red", temperature=0), dict(prompt="green apples", temperature=1.3, seed=4),
            dict(prompt="abc abc abc", temperature=0, exitspec={"strategy": "lookup", "options": {"draft_len": 3}}),
            dict(prompt="blue", temperature=0.8, top_p=0.9, seed=11,
                 exitspec={"strategy": "lookup", "options": {"draft_len": 3}})]
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        kw = dict(asks[i])
        ext = kw.pop("exitspec", None)
        results[i] = client.completions.create(model="tiny", max_tokens=MAX + i, extra_body={"exitspec": ext}
                                               if ext else None, **kw)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, kw in enumerate(asks):
        kw = dict(kw)
        ext = kw.pop("exitspec", None) or {}
        ref = exitspec.generate(tiny, kw.pop("prompt"), chat=False, max_new_tokens=MAX + i,
                                strategy=ext.get("strategy", "vanilla"), **ext.get("options", {}), **kw)
        assert results[i].choices[0].text == ref.text, asks[i]
    assert max(r.model_extra["exitspec"]["batch_size"] for r in results.values()) > 1


def test_metrics_in_prometheus_text_format(server, client):
    assert httpx.post(server.base + "/v1/completions", json={"model": "tiny", "prompt": ""}).status_code == 400
    client.completions.create(model="tiny", prompt="abc abc abc", max_tokens=6, temperature=0,
                              extra_body={"exitspec": {"strategy": "lookup"}})
    r = httpx.get(server.base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("exitspec_requests_total", "exitspec_prompt_tokens_total", "exitspec_generation_tokens_total",
                 "exitspec_queue_length", "exitspec_running_rows", "exitspec_batch_size_bucket",
                 "exitspec_time_to_first_token_seconds_bucket", "exitspec_inter_token_latency_seconds_bucket",
                 "exitspec_accepted_drafts_per_verification_bucket"):
        assert f"\n{name}" in text, name
    assert _metric(server, 'exitspec_requests_total{status="200"}') >= 1
    assert _metric(server, 'exitspec_requests_total{status="400"}') >= 1
    assert _metric(server, "exitspec_accepted_drafts_per_verification_count") >= 1
    assert _metric(server, "exitspec_generation_tokens_total") >= 6


def test_unknown_default_strategy_stops_the_server_with_a_clear_error(tiny_dir):
    cmd = [sys.executable, "-m", "exitspec.cli", "serve", "--model", str(tiny_dir), "--strategy", "warp-drive",
           "--port", "0"]
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown strategy 'warp-drive'" in out.stderr


@pytest.mark.slow
def test_default_model_server_runs_the_fastest_path_and_matches_generate(default_model):
    """`exitspec serve` with no flags: int4 weights where the kernels run, the shipped heads, lookup
    (lossless: the int4 vanilla loop's answer token for token)."""
    from exitspec import kernels

    srv = ServerProcess("--model", "default")
    try:
        h = httpx.get(srv.base + "/health").json()
        fast = kernels.unavailable_reason() is None
        assert h["weights"] == ("int4" if fast else "dense") and h["heads"] and h["strategy"] == "lookup", h
        with openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            name = c.models.list().data[0].id
            assert name == default_model.name
            msgs = [{"role": "user", "content": "What is the capital of France?"}]
            r = c.chat.completions.create(model=name, messages=msgs, max_tokens=16, temperature=0)
            with one_torch_thread():  # the server is busy on the other core
                m = exitspec.load("default", weights="int4") if fast else default_model
                ref = exitspec.generate(m, msgs, max_new_tokens=16)
            assert r.choices[0].message.content == ref.text
            assert r.usage.completion_tokens == len(ref.token_ids[0])
            streamed = c.chat.completions.create(model=name, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True)
            assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == ref.text
    finally:
        out = srv.stop()
    assert "Traceback" not in out, out
