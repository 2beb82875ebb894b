"""Load test of `exitspec serve`: N concurrent streaming clients on loopback (not run in CI).

    PYTHONPATH=src python benchmarks/load_test.py --clients 32 --max-tokens 32 --out benchmarks/load_test.md

Starts the server (`--model default` unless --base-url names a running one), sends one warm-up
request alone (the single-client baseline), then has every client send `--rounds` streaming chat
requests back to back, all clients at once. Reports requests completed, errors, total completion
tokens/s over the burst's wall time, p50/p95 latency and time to first token, the batch sizes the
scheduler formed, and whether /health still answers afterwards.
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
    error: str = ""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Outcome:
    t0 = time.perf_counter()
    ttft, tokens, batch = None, 0, 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.choices and chunk.choices[0].finish_reason:
                batch = (chunk.model_extra or {}).get("exitspec", {}).get("batch_size", 0)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as err:  # every failure counts as an error; the run goes on
        return Outcome(ok=False, latency_s=time.perf_counter() - t0, error=f"{type(err).__name__}: {err}")
    return Outcome(ok=True, latency_s=time.perf_counter() - t0, ttft_s=ttft, tokens=tokens, batch_size=batch)


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


def report(args, machine: str, warm: Outcome, run: Run, health: dict | None) -> str:
    ok = [o for o in run.outcomes if o.ok]
    errors = [o for o in run.outcomes if not o.ok]
    tokens = sum(o.tokens for o in ok)
    lat = [o.latency_s for o in ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    batches = sorted({o.batch_size for o in ok})
    cmd = "PYTHONPATH=src python benchmarks/load_test.py " + " ".join(sys.argv[1:])
    lines = [
        "# exitspec serve: load test",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {machine}",
        "",
        f"Load average (1/5/15 min) at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the CPU is shared with other jobs)",
        "",
        f"Server: `exitspec serve --model {args.model} --strategy {args.strategy} --max-batch {args.max_batch} "
        f"--threads {args.threads}` "
        "on 127.0.0.1; clients: the official `openai` client (AsyncOpenAI), streaming chat completions, "
        f"greedy, max_tokens={args.max_tokens}; prompts: held-out public prompts (exitspec.prompts.mixed_prompts, "
        f"user turns cut to {args.max_chars} characters).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| clients x rounds | {args.clients} x {args.rounds} = {len(run.outcomes)} requests |",
        f"| requests completed | {len(ok)} |",
        f"| errors | {len(errors)} |",
        f"| burst wall time | {run.wall_s:.1f} s |",
        f"| completion tokens | {tokens} |",
        f"| total tokens/s (completion tokens / burst wall time) | {tokens / run.wall_s:.1f} |",
        f"| latency p50 / p95 / max | {pct(lat, .5):.2f} / {pct(lat, .95):.2f} / {max(lat, default=0):.2f} s |",
        f"| time to first token p50 / p95 | {pct(ttft, .5):.2f} / {pct(ttft, .95):.2f} s |",
        f"| batch sizes formed by the scheduler | {', '.join(map(str, batches))} |",
        f"| single client alone (warm-up request) | {warm.tokens} tokens in {warm.latency_s:.2f} s = "
        f"{warm.tokens / warm.latency_s:.1f} tokens/s, first token {warm.ttft_s or 0:.2f} s |",
        f"| /health afterwards | {health if health else 'NO ANSWER'} |",
    ]
    if errors:
        lines += ["", "Errors:", *sorted({f"- {e.error}" for e in errors})]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None, help="a running server; default: start one on a free port")
    p.add_argument("--model", default="default")
    p.add_argument("--strategy", default="vanilla")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="server torch threads (1: robust on a CPU shared with other jobs)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-chars", type=int, default=600, help="cut prompts to this many characters")
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args()

    from exitspec.bench.machine import describe_machine, machine_line
    from exitspec.prompts import mixed_prompts

    prompts = [pr.text for pr in mixed_prompts("heldout", 16, max_chars=args.max_chars)]
    server = None
    if args.base_url is None:
        from helpers_server import ServerProcess

        server = ServerProcess("--model", args.model, "--strategy", args.strategy, "--max-batch",
                               str(args.max_batch), threads=args.threads, startup_s=600)
        base = server.base
    else:
        base = args.base_url.rstrip("/")
    try:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        warm = asyncio.run(burst(base, model, prompts, 1, 1, args.max_tokens)).outcomes[0]
        run = asyncio.run(burst(base, model, prompts, args.clients, args.rounds, args.max_tokens))
        try:
            health = httpx.get(base + "/health", timeout=10).json()
        except httpx.HTTPError:
            health = None
    finally:
        if server is not None:
            log = server.stop()
            if "Traceback" in log:
                print(log, file=sys.stderr)
    machine = describe_machine()
    machine["threads"] = args.threads if server is not None else "?"  # the server's, not this client's
    text = report(args, machine_line(machine), warm, run, health)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if health and all(o.ok for o in run.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
