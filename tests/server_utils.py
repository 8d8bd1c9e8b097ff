"""Start a real `rlserve serve` subprocess on a free port for a test, and stop it (and its children)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, *args: str, startup_timeout: float = 120.0, env: dict | None = None,
                 device: str = "cpu"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # --seed 0: unseeded requests draw the same samples in every run, so that tests are reproducible (the
        # server's default is fresh entropy); a test's own --seed comes later and wins.
        cmd = [sys.executable, "-m", "rlserve.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--device", device, "--log_level", "warning", "--seed", "0", *args]
        self.log = open(os.devnull, "w") if os.environ.get("RLSERVE_TEST_QUIET") else None
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True)
        self.wait_healthy(startup_timeout)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up")
            try:
                if httpx.get(self.url + "/health/", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def running_server(model: str, *args: str, **kwargs):
    server = ServerProcess(model, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
