"""Shared fixtures: tiny random models (made once per session) and the GPU marker."""

from __future__ import annotations

import os

import pytest
import torch

from rlserve.models.tiny import FAMILIES, make_tiny_model


def _setup_triton_interpreter() -> None:
    """RLSERVE_TRITON_INTERPRET=1 runs the Triton kernel tests on CPU tensors under Triton's interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit kernel is defined
    from rlserve.debug import patch_triton_interpreter
    patch_triton_interpreter()


TRITON_INTERPRET = os.environ.get("RLSERVE_TRITON_INTERPRET") == "1"
if TRITON_INTERPRET:
    _setup_triton_interpreter()


class KernelLaunches:
    """Stands in for a Triton kernel: records its launches' grids (``kernel[grid](...)``, under graph capture too)
    and runs them. ``monkeypatch.setattr(module, "_kernel", KernelLaunches(module._kernel))``."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    @property
    def count(self) -> int:
        return len(self.grids)

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def triton_kernel_module() -> tuple[str, list]:
    """(device, pytestmark) of a Triton kernel test module: CPU tensors and no marks under the interpreter;
    otherwise CUDA, marked ``gpu`` and skipped without a device."""
    if TRITON_INTERPRET:
        return "cpu", []
    return "cuda", [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                        reason="needs CUDA (or RLSERVE_TRITON_INTERPRET=1)")]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """family -> path of a tiny random model with the byte tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {family: str(make_tiny_model(root / family, family, seed=i)) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models["qwen2"]


@pytest.fixture(scope="session")
def llm(tiny_model):
    """One shared CPU engine on the Qwen2 tiny model (tests must leave it idle)."""
    from rlserve import LLM
    return LLM(tiny_model, device="cpu")


def assert_no_leak(llm) -> None:
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert not llm.engine.has_unfinished()
    assert not llm.engine.requests, list(llm.engine.requests)  # every finished request let go
    assert bm.num_free_blocks == bm.num_blocks, (bm.num_free_blocks, bm.num_blocks)
    penalties = llm.engine.runner.penalties
    assert not penalties.slot_of and len(penalties.free_slots) == penalties.num_slots, penalties.slot_of
