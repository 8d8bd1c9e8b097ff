"""Operational aids shared by rlserve's processes."""

from __future__ import annotations

import faulthandler
import signal


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints every thread's Python stack to stderr: where a stuck server, replica or
    tensor-parallel worker waits, without stopping it (the API server, each replica and each TP worker
    install it)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
