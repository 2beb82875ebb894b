"""llama.cpp as a benchmark peer: its server on the same GGUF file, plain or speculative.

llama.cpp is what a CPU user would run instead of exitspec, so `exitspec bench` times it on the same
prompts and budget as every other contender (run name `llama.cpp`):

    --run 'llama.cpp'                                   # plain decoding
    --run 'llama.cpp spec=ngram-simple'                 # one of its n-gram speculative modes
    --run 'llama.cpp spec=draft-simple draft_exit=8'    # the attached heads' exit 8 (norm_lm without
                                                        # heads), exported as a draft GGUF (export/)
    --run 'llama.cpp spec=draft-simple draft=PATH.gguf' # any draft model

Why the server: one long-lived process per run (the model is loaded once, as exitspec's is), and
its /completion endpoint takes the prompt as token ids and returns token ids, so llama.cpp decodes
exactly the other contenders' prompts and none of them is re-tokenised. `ignore_eos` makes it
generate the whole budget, like every contender here. Times are the wall time of the request on
localhost (prefill included, as for every contender); the time to the first token is the server's
own prompt time; drafts and accepted drafts are the server's counts.

The binary: `binary=PATH` in the run, else $EXITSPEC_LLAMA_SERVER (`exitspec bench --llama-server
PATH` sets it), else `llama-server` on PATH. Without one the run is skipped with that reason. How to
build one from the llama-cpp-python source distribution on PyPI: README, "llama.cpp as a peer".
The model must be a GGUF file (the embedded default is one); other models are skipped with the reason.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from exitspec.bench.config import RunSpec
from exitspec.bench.contenders import Contender, PeerUnavailable, Sample, spread_accepts
from exitspec.decoding.exits import exit_bundle
from exitspec.loading import embedded_gguf_path

ENV = "EXITSPEC_LLAMA_SERVER"
SPEC_TYPES = ("none", "draft-simple", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
OPTIONS = ("spec", "draft", "draft_exit", "draft_max", "draft_type", "threads", "binary", "ctx")
START_TIMEOUT_S = 120


def find_server(explicit: str | None = None) -> Path:
    """The llama-server binary: `explicit`, else $EXITSPEC_LLAMA_SERVER, else on PATH."""
    for candidate, origin in ((explicit, "binary="), (os.environ.get(ENV), f"${ENV}")):
        if candidate:
            path = Path(candidate).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise PeerUnavailable(f"llama.cpp: {origin}{candidate} is not an executable llama-server")
            return path
    found = shutil.which("llama-server")
    if found is None:
        raise PeerUnavailable(f"llama.cpp: no llama-server binary (pass --llama-server PATH, set ${ENV}, or put "
                              "it on PATH; README, 'llama.cpp as a peer', shows how to build one)")
    return Path(found)


def model_gguf(model) -> Path:
    """The GGUF file the model was loaded from (llama.cpp reads nothing else)."""
    source = getattr(model, "source", "")
    embedded = embedded_gguf_path(str(source))  # "default", "gemma3-270m"
    if embedded is not None:
        return embedded
    if str(source).endswith(".gguf") and Path(source).is_file():
        return Path(source)
    raise PeerUnavailable(f"llama.cpp reads GGUF files and {source!r} is not one; benchmark the model's GGUF "
                          "(model=PATH.gguf) to include it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer(Contender):
    """One llama-server process for this run's settings, started on creation, stopped at exit."""

    def __init__(self, spec: RunSpec, model):
        super().__init__(spec, model)
        opts = spec.strategy_opts
        unknown = sorted(set(opts) - set(OPTIONS))
        if unknown:
            raise ValueError(f"llama.cpp takes {', '.join(OPTIONS)}; not {unknown}")
        self.spec_type = str(opts.get("spec", "none"))
        if self.spec_type not in SPEC_TYPES:
            raise ValueError(f"llama.cpp spec must be one of {', '.join(SPEC_TYPES)}, got {self.spec_type!r}")
        binary = find_server(opts.get("binary"))
        gguf = model_gguf(model)
        self.workdir = Path(tempfile.mkdtemp(prefix="exitspec-llama-cpp-"))
        args = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port := _free_port()),
                "-t", str(int(opts.get("threads", os.cpu_count() or 1))), "-c", str(int(opts.get("ctx", 4096))),
                "-np", "1", "--no-webui"]
        if self.spec_type != "none":
            args += ["--spec-type", self.spec_type, "--spec-draft-n-max", str(int(opts.get("draft_max", 4)))]
        if self.spec_type == "draft-simple":
            args += ["-md", str(self._draft_gguf(opts))]
        self.args = args
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.workdir / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self.close)
        self._wait_ready()

    def _draft_gguf(self, opts: dict) -> Path:
        """`draft=PATH`, or `draft_exit=L`: exit L of the attached heads written as a draft GGUF."""
        if opts.get("draft"):
            return Path(opts["draft"]).expanduser()
        if opts.get("draft_exit") is None:
            raise ValueError("llama.cpp spec=draft-simple needs draft=PATH.gguf or draft_exit=L (an exit of the "
                             "attached heads, exported as its draft model)")
        from exitspec.export.gguf import export_gguf  # optional: only a draft_exit run exports

        layer = int(opts["draft_exit"])
        out = self.workdir / f"draft-{layer}.gguf"
        # The attached bundle's exit, or the logit lens (norm_lm) where none is attached, as hf-assisted.
        return export_gguf(self.model, exit_bundle(self.model, [layer], contextual=True), layer, out,
                           str(opts.get("draft_type", "Q8_0")))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"llama-server exited with code {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.close()
        raise PeerUnavailable(f"llama-server did not answer within {START_TIMEOUT_S} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Sample:
        body = {"prompt": ids, "n_predict": max_new_tokens, "temperature": temperature, "seed": seed,
                "ignore_eos": True, "cache_prompt": False, "return_tokens": True, "stream": False}
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        total = time.perf_counter() - t0
        tokens = [int(t) for t in out.get("tokens", [])]
        timings = out.get("timings", {})
        sample = Sample(tokens=tokens, total_s=total, ttft_s=timings.get("prompt_ms", 0.0) / 1000 or None)
        if self.spec_type != "none":
            # The server reports the counts only where it drafted at all. Only totals are known: each
            # verification keeps `a` drafts and adds one token, so there were len(tokens) - accepted
            # of them; spread evenly (exact mean, no histogram).
            drafted, accepted = timings.get("draft_n", 0), timings.get("draft_n_accepted", 0)
            sample.drafted = int(drafted)
            sample.accept_lengths = spread_accepts(int(accepted), len(tokens) - int(accepted))
            sample.accept_lengths_exact = False
        return sample

    def describe(self) -> dict:
        return {**super().describe(), "command": " ".join(self.args)}

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
