"""Run ``rlserve serve`` as a child process on a free local port: the one launcher of the demo, the benchmarks
and the tests.

It knows nothing about what the server does: it builds the command line, waits (with a deadline) until
``/health/`` answers 200, and stops the server's whole process group (API process, engine cores, TP workers).
Importing it costs no FastAPI and no torch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it, so that two runs on one host do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``rlserve serve --model MODEL ARGS...`` on 127.0.0.1, healthy when the constructor returns.

    ``args`` are passed after the launcher's own flags, so that a caller's ``--log_level`` or ``--seed`` wins.
    The child gets a session of its own: ``stop`` signals the session leader (SIGTERM: a graceful drain),
    then kills the whole group if it does not exit in time.
    """

    def __init__(self, model: str, *args: str, port: int | None = None, startup_timeout: float = 120.0,
                 env: dict | None = None, stdout=None, poll_s: float = 0.2):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rlserve.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--log_level", "warning", *args]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=stdout, start_new_session=True)
        try:
            self.wait_healthy(startup_timeout, poll_s)
        except BaseException:  # a timeout, a failed start or Ctrl-C: leave no server behind
            self.stop()
            raise

    def wait_healthy(self, timeout: float, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up")
            try:
                if httpx.get(self.url + "/health/", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"server not healthy after {timeout}s")

    def children(self) -> list:
        """The server's child processes, recursively (psutil.Process objects)."""
        import psutil
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL to the process group after ``timeout`` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode
