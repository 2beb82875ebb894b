"""Load test of `exitspec serve`, and of llama.cpp's `llama-server` under the same load (not run in CI).

    PYTHONPATH=src python benchmarks/load_test.py --out benchmarks/load_test.md
    PYTHONPATH=src python benchmarks/load_test.py --llama-server ~/llama.cpp/build/bin/llama-server --out ...

For each server (exitspec: `exitspec serve` on the fastest path by default - int4 weights, the shipped
heads, lookup; llama.cpp: `llama-server -np N` on the same GGUF, continuous batching, when a binary
is found: --llama-server, $EXITSPEC_LLAMA_SERVER or PATH; how to build one from the llama-cpp-python
source distribution: README, "llama.cpp as a peer") it runs two loads, one after the other, with the
official `openai` client streaming greedy chat completions: 1 client (`--single-rounds` requests back
to back) and `--clients` clients x `--rounds` requests at once. Reported per load: requests, errors,
aggregate completion tokens/s over the load's wall time, time to first token p50 / p95, latency p50,
and the scheduler's batch sizes. Then one stream through the server is paired with exitspec's
in-process loop (`exitspec.generate`, same weights, strategy, threads), prompt by prompt, alternating.
Run it on a quiet machine: nothing else may share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


@dataclass
class Outcome:
    ok: bool
    latency_s: float = 0.0
    ttft_s: float | None = None
    tokens: int = 0
    batch_size: int = 0
    server_s: float | None = None  # exitspec's own count: request queued to last token (its response's stats)
    error: str = ""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Outcome:
    t0 = time.perf_counter()
    ttft, tokens, batch, chunks, server_s = None, 0, 0, 0, None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if chunk.choices and chunk.choices[0].finish_reason:
                stats = (chunk.model_extra or {}).get("exitspec", {})
                batch = stats.get("batch_size", 0)
                if "decode_s" in stats:
                    server_s = stats["queue_s"] + stats["decode_s"]
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as err:  # every failure counts as an error; the run goes on
        return Outcome(ok=False, latency_s=time.perf_counter() - t0, error=f"{type(err).__name__}: {err}")
    # A server that sends no usage (older llama-server builds): one content chunk per token.
    return Outcome(ok=True, latency_s=time.perf_counter() - t0, ttft_s=ttft, tokens=tokens or chunks,
                   batch_size=batch, server_s=server_s)


async def burst(base: str, model: str, prompts: list[str], clients: int, rounds: int, max_tokens: int) -> Run:
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=900,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4),
                                                                timeout=900)) as client:

        async def user(i: int) -> list[Outcome]:
            return [await one_request(client, model, prompts[(i * rounds + r) % len(prompts)], max_tokens)
                    for r in range(rounds)]

        t0 = time.perf_counter()
        per_user = await asyncio.gather(*(user(i) for i in range(clients)))
        return Run([o for u in per_user for o in u], time.perf_counter() - t0)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def summary(name: str, load: str, run: Run) -> dict:
    ok = [o for o in run.outcomes if o.ok]
    tokens = sum(o.tokens for o in ok)
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    return {"server": name, "load": load, "requests": len(run.outcomes), "errors": len(run.outcomes) - len(ok),
            "tokens": tokens, "wall_s": run.wall_s, "tokens_per_s": tokens / run.wall_s if run.wall_s else 0.0,
            "ttft_p50": pct(ttft, .5), "ttft_p95": pct(ttft, .95), "latency_p50": pct([o.latency_s for o in ok], .5),
            "batches": sorted({o.batch_size for o in ok if o.batch_size}),
            "error_text": sorted({o.error for o in run.outcomes if not o.ok})}


def report(args, machine: str, rows: list[dict], paired: dict, llama: str, health: dict | None) -> str:
    cmd = "PYTHONPATH=src python benchmarks/load_test.py " + " ".join(sys.argv[1:])
    lines = [
        "# exitspec serve under load" + (" vs llama.cpp's llama-server" if any(r["server"] != "exitspec"
                                                                            for r in rows) else ""),
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {machine}",
        "",
        f"Load average (1/5/15 min) at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
        f"exitspec: `exitspec serve --model {args.model} {' '.join(args.serve_args)} --max-batch {args.max_batch} "
        f"--threads {args.threads}`. llama.cpp: {llama}. Clients: the official `openai` client (AsyncOpenAI), "
        f"streaming chat completions, greedy, max_tokens={args.max_tokens}; prompts: held-out public prompts "
        f"(exitspec.prompts.mixed_prompts, user turns cut to {args.max_chars} characters).",
        "",
        "| server | load | requests | errors | tokens/s (aggregate) | TTFT p50 / p95 | latency p50 | batch sizes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['server']} | {r['load']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} s | {r['latency_p50']:.2f} s | "
                     f"{', '.join(map(str, r['batches'])) or '-'} |")
    lines += ["", f"One stream against the in-process loop (`exitspec.generate`, same weights, strategy, threads "
                  f"and prompts), paired: {paired['requests']} prompts, each run in process and then through the "
                  f"idle server, alternating; wall time from request to last token on both sides. In process "
                  f"{paired['in_process']:.1f} tokens/s, through the server {paired['server']:.1f} "
                  f"({paired['server'] / paired['in_process']:.0%} of it), as the server counts it itself (request "
                  f"queued to last token, the `exitspec` stats of its response) {paired['server_side']:.1f} "
                  f"({paired['server_side'] / paired['in_process']:.0%}). The gap between the two is the client, "
                  "which shares the 2 cores here (the official client parses every chunk into pydantic models)."]
    lines += ["", f"/health after the runs: {health if health else 'NO ANSWER'}"]
    errors = sorted({e for r in rows for e in r["error_text"]})
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def run_loads(name: str, base: str, prompts: list[str], args) -> list[dict]:
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    asyncio.run(burst(base, model, prompts, 1, 1, 4))  # warm-up, not counted
    one = asyncio.run(burst(base, model, prompts, 1, args.single_rounds, args.max_tokens))
    many = asyncio.run(burst(base, model, prompts, args.clients, args.rounds, args.max_tokens))
    return [summary(name, f"1 client x {args.single_rounds}", one),
            summary(name, f"{args.clients} clients x {args.rounds}", many)]


def start_llama_server(binary: Path, gguf: Path, args):
    """llama-server on a free port with -np = the client count (its continuous batching slots)."""
    import subprocess
    import tempfile

    from helpers_server import free_port

    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed with the process
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-np", str(args.clients), "-c", str(args.clients * (args.max_tokens + 1024)), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama-server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, " ".join([Path(cmd[0]).name, *cmd[1:]])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not answer /health within 300 s")


def paired_single_stream(args, base: str, prompts: list[str]) -> dict:
    """One stream through the server against exitspec's in-process loop (`exitspec.generate`, same
    weights, strategy, threads), paired: each prompt runs in process, then through the idle server,
    alternating, so a drift in the machine's speed hits both sides alike. Both sides count wall time
    from request to last token (prompt included)."""
    import torch

    import exitspec
    from exitspec.commands import fast_path

    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(model=args.model, dtype=None, device="cpu", weights=args.weights, kv_cache=None,
                            heads=args.heads, threads=args.threads)
    m, _ = fast_path.load_fastest(ns)
    strategy = fast_path.resolve_strategy(args.strategy, m)
    exitspec.generate(m, prompts[0], max_new_tokens=4, strategy=strategy)  # warm-up
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    inp = [0.0, 0.0]  # tokens, seconds
    srv = [0.0, 0.0, 0.0]  # tokens, seconds at the client, seconds the server counted

    async def alternate() -> None:  # one client and connection for every server request, as a chat app keeps
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=900) as client:
            await one_request(client, model, prompts[0], 4)  # connects
            for i in range(args.single_rounds):
                prompt = prompts[i % len(prompts)]
                r = exitspec.generate(m, prompt, max_new_tokens=args.max_tokens, strategy=strategy)
                inp[0] += r.stats.new_tokens
                inp[1] += r.stats.total_s
                o = await one_request(client, model, prompt, args.max_tokens)
                srv[0] += o.tokens
                srv[1] += o.latency_s
                srv[2] += o.server_s or float("nan")

    asyncio.run(alternate())
    return {"in_process": inp[0] / inp[1], "server": srv[0] / srv[1], "server_side": srv[0] / srv[2],
            "requests": args.single_rounds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--weights", default="auto")
    p.add_argument("--heads", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server torch threads (default: all)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    p.add_argument("--single-rounds", type=int, default=8, help="requests of the 1-client load")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-chars", type=int, default=600, help="cut prompts to this many characters")
    p.add_argument("--llama-server", default=None, help="llama-server binary (default: $EXITSPEC_LLAMA_SERVER, "
                   "PATH); skipped with the reason when none is found")
    p.add_argument("--stream-interval-ms", type=float, default=50.0,
                   help="exitspec serve's --stream-interval-ms (its default: 50)")
    p.add_argument("--no-llama", action="store_true", help="skip llama-server")
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args()
    args.serve_args = ["--weights", args.weights, "--heads", args.heads, "--strategy", args.strategy,
                       "--stream-interval-ms", f"{args.stream_interval_ms:g}"]

    from exitspec.bench.contenders import PeerUnavailable
    from exitspec.bench.llama_cpp import find_server
    from exitspec.bench.machine import describe_machine, machine_line
    from exitspec.loading import DEFAULT_MODEL, default_gguf_path
    from exitspec.prompts import mixed_prompts
    from helpers_server import ServerProcess

    prompts = [pr.text for pr in mixed_prompts("heldout", 16, max_chars=args.max_chars)]
    rows: list[dict] = []
    server = ServerProcess("--model", args.model, *args.serve_args, "--max-batch", str(args.max_batch),
                           threads=args.threads, startup_s=600)
    try:
        rows += run_loads("exitspec", server.base, prompts, args)
        paired = paired_single_stream(args, server.base, prompts)
        try:
            health = httpx.get(server.base + "/health", timeout=10).json()
        except httpx.HTTPError:
            health = None
    finally:
        log = server.stop()
        if "Traceback" in log:
            print(log, file=sys.stderr)
    llama = "not run"
    try:
        if args.no_llama:
            raise PeerUnavailable("--no-llama")
        binary = find_server(args.llama_server)
        gguf = default_gguf_path() if args.model == DEFAULT_MODEL else Path(args.model)
        if gguf.suffix != ".gguf":
            raise PeerUnavailable(f"llama.cpp reads GGUF files and {args.model!r} is not one")
        proc, base, llama = start_llama_server(binary, gguf, args)
        llama = f"`{llama}`"
        try:
            rows += run_loads("llama.cpp", base, prompts, args)
        finally:
            proc.terminate()
            proc.wait(30)
    except PeerUnavailable as err:
        llama = f"not run ({err})"
    machine = describe_machine()
    machine["threads"] = args.threads
    text = report(args, machine_line(machine), rows, paired, llama, health)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if health and not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
