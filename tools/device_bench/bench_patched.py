"""Run an rlserve CLI command with a module attribute set first: an A/B of a constant without an environment knob.

python tools/device_bench/bench_patched.py MODULE.ATTRIBUTE=VALUE -- bench --workload rl-7b ...: VALUE is a Python
literal. The engine of `rlserve bench` runs in this process, so the patched value is the one it uses (e.g.
rlserve.attention.triton_paged._ONE_WARP_MIN_PROGRAMS_PER_SM=1073741824: decode attention without one-warp
programs)."""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

from rlserve.cli import main


def patch(assignment: str) -> None:
    target, value = assignment.split("=", 1)
    module, attribute = target.rsplit(".", 1)
    setattr(importlib.import_module(module), attribute, ast.literal_eval(value))


def note_patches(argv: list[str], patches: list[str]) -> None:
    """Record the patches in the bench's JSON (``--output``), so that its file says what it measured."""
    if "--output" in argv and argv.index("--output") + 1 < len(argv):
        path = Path(argv[argv.index("--output") + 1])
        if path.is_file():
            report = json.loads(path.read_text())
            report["patched"] = patches
            path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if "--" not in sys.argv:
        sys.exit(__doc__)
    split = sys.argv.index("--")
    patches, command = sys.argv[1:split], sys.argv[split + 1:]
    for assignment in patches:
        patch(assignment)
    code = main(command)
    note_patches(command, patches)
    sys.exit(code)
