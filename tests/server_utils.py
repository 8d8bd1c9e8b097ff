"""Start a real `rlserve serve` subprocess on a free port for a test, and stop it (and its children).

The launcher is rlserve's own (rlserve/server/process.py); the tests add their defaults to it.
"""

from __future__ import annotations

import os
import subprocess

from rlserve.server.process import ServerProcess as _ServerProcess
from rlserve.server.process import free_port

__all__ = ["ServerProcess", "free_port", "running_server"]


class ServerProcess(_ServerProcess):
    def __init__(self, model: str, *args: str, startup_timeout: float = 120.0, env: dict | None = None,
                 device: str = "cpu"):
        # --seed 0: unseeded requests draw the same samples in every run, so that tests are reproducible (the
        # server's default is fresh entropy); a test's own --seed comes later and wins.
        quiet = subprocess.DEVNULL if os.environ.get("RLSERVE_TEST_QUIET") else None
        super().__init__(model, "--device", device, "--seed", "0", *args, startup_timeout=startup_timeout,
                         env=env, stdout=quiet)


# `with running_server(model, *flags) as server:` -- a ServerProcess is its own context manager (stopped on exit)
running_server = ServerProcess
