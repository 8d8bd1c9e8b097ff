"""Run an rlserve CLI command with a module attribute set first: an A/B of a constant without an environment knob.

python tools/device_bench/bench_patched.py MODULE.ATTRIBUTE=VALUE -- bench --workload rl-7b ...: VALUE is a Python
literal. The engine of `rlserve bench` runs in this process, so the patched value is the one it uses (e.g.
rlserve.attention.triton_paged._ONE_WARP_MIN_PROGRAMS_PER_SM=1073741824: decode attention without one-warp
programs)."""

from __future__ import annotations

import ast
import importlib
import sys

from rlserve.cli import main


def patch(assignment: str) -> None:
    target, value = assignment.split("=", 1)
    module, attribute = target.rsplit(".", 1)
    setattr(importlib.import_module(module), attribute, ast.literal_eval(value))


if __name__ == "__main__":
    split = sys.argv.index("--")
    for assignment in sys.argv[1:split]:
        patch(assignment)
    sys.exit(main(sys.argv[split + 1:]))
