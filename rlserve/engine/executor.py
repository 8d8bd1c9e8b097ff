"""Builds the engine for a config: one in-process core, or a core driving tensor-parallel workers."""

from __future__ import annotations

from rlserve.config import EngineConfig


def make_engine(config: EngineConfig):
    if config.tensor_parallel_size == 1:
        from rlserve.engine.core import EngineCore
        return EngineCore(config)
    from rlserve.distributed.tp_engine import TensorParallelEngine
    return TensorParallelEngine(config)
