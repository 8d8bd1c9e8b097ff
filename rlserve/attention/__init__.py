"""Attention backends over the paged KV cache: one interface, chosen by device.

A backend is a pair of functions: ``write_kv(k, v, k_cache, v_cache, slot_mapping)`` stores the new tokens'
keys and values, and ``attend(q, k_cache, v_cache, meta, scale)`` computes attention for the batch described
by an ``AttentionMetadata``. ``reference`` (plain PyTorch, any device) is the oracle; ``triton`` is the
CUDA path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlserve.attention.metadata import AttentionMetadata, SharedPrefixes

__all__ = ["AttentionBackend", "AttentionMetadata", "SharedPrefixes", "get_backend"]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: Callable
    attend: Callable
    supports_cuda_graphs: bool
    # Decode rows sharing a prefix read it once a group (AttentionMetadata.shared_prefixes): a group's query rows
    # (members x query heads per KV head) are at most this many; 0: the backend has no such pass.
    shared_prefix_rows: int = 0
    # (num_kv_heads, device) -> the fewest decode rows whose attention takes that pass (smaller batches ignore a plan)
    shared_prefix_min_batch: Callable | None = None


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """``name``: "auto" (Triton on CUDA when available, else reference), "reference" or "triton"."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _has_triton() else "reference"
    if name == "reference":
        from rlserve.attention import reference
        return AttentionBackend("reference", reference.write_kv, reference.paged_attention, False)
    if name == "triton":
        from rlserve.attention import triton_paged
        return AttentionBackend("triton", triton_paged.store_kv, triton_paged.paged_attention, True,
                                triton_paged.SHARED_PREFIX_ROWS, triton_paged.shared_prefix_min_batch)
    raise ValueError(f"attention backend must be 'auto', 'reference' or 'triton', got {name!r}")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
