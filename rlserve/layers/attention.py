"""The attention layer: applies the rotary embedding, stores the new K/V in this layer's slice of the paged
cache, then attends.

The cache tensors and the backend are bound by the model runner once the cache is allocated; the model code
itself stays plain PyTorch. Where the fused kernels run (``fuse_rotary_store``, the runner's choice:
layers/fused.py), the rotary embedding and the store are one kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from rlserve.attention import AttentionBackend, AttentionMetadata
from rlserve.layers import fused
from rlserve.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    fuse_rotary_store = False  # the model runner's choice (layers/fused.py)

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, KVH, D]
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend | None = None

    def bind(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend: AttentionBackend) -> None:
        self.k_cache, self.v_cache, self.backend = k_cache, v_cache, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                positions: torch.Tensor | None = None, rotary: RotaryEmbedding | None = None) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> [T, H, D]; ``rotary`` at ``positions`` [T] is applied to q and k first.
        With the fused kernel q is rotated in place and k is left unrotated (only the cache gets its rotated rows)."""
        if rotary is not None and positions is None:
            raise ValueError("Attention: rotary needs the tokens' positions")
        if rotary is not None and self.fuse_rotary_store:
            fused.rotary_store_(q, k, v, rotary.cos, rotary.sin, positions, self.k_cache, self.v_cache,
                                meta.slot_mapping)
        else:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            self.backend.write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale)
