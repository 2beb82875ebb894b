"""Helpers for the server tests: a tiny model saved to a folder, and a real server subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import conftest
from exitspec.calibration.estimator import single_thread

REPO = Path(__file__).resolve().parents[1]
# Every character of the template output is in the char tokenizer's vocabulary (printable ASCII).
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tiny_model(folder: Path) -> Path:
    """A tiny random llama + character tokenizer with a chat template, saved as an HF folder."""
    return conftest.save_tiny_model(folder, layers=4, chat_template=CHAT_TEMPLATE)


# Decode in the test process with one torch thread (see ServerProcess on why), then restore.
one_torch_thread = single_thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class ServerProcess:
    """`python -m exitspec.cli serve ...` on a free loopback port; stop() kills it.

    One torch thread by default: on a CPU shared with other jobs, two OpenMP threads on two busy
    cores spin at every barrier (measured here: 0.24 vs 5.9 tokens/s on the default model)."""

    def __init__(self, *args: str, threads: int = 1, startup_s: float = 120.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "exitspec.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", str(threads), "--log-level", "warning", *args]
        # A file, not a pipe: a pipe nobody reads would block the server once it filled up.
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {startup_s} s")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        out = self.output()
        self.log.close()
        return out

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()
