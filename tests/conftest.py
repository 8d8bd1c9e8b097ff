"""Shared fixtures: tiny random models (made once per session) and the GPU marker."""

from __future__ import annotations

import pytest
import torch

from rlserve.models.tiny import FAMILIES, make_tiny_model


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
    assert bm.num_free_blocks == bm.num_blocks, (bm.num_free_blocks, bm.num_blocks)
