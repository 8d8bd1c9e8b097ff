"""Tensor-parallel linear layers whose parameters know how to load a Hugging Face tensor.

Every parameter carries ``weight_loader(param, loaded, shard_id)``: it takes the full (unsharded) tensor as
stored in a checkpoint or sent by a trainer, cuts this rank's slice and copies it into its fused slot. Loading
a checkpoint and applying a weight update are the same call.

- ``ColumnParallelLinear``: output features split over ranks (no communication).
- ``MergedColumnParallelLinear``: several column-parallel outputs fused in one GEMM (gate + up).
- ``QKVParallelLinear``: q, k, v fused; heads split over ranks.
- ``RowParallelLinear``: input features split; partial outputs summed with an all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlserve.distributed.parallel import SINGLE, TensorParallel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with batches of a few rows padded to 8 on CPUs.

    CPU BLAS takes a matrix-vector path for 1-4 rows, whose rounding differs from its matrix path: a seeded
    request running alone would then draw from logits a few ulps away from those it gets inside a batch, and
    a draw at a near-tie could flip. Padding keeps the one path. (BLAS also re-blocks the inner dimension at
    some larger batch sizes, so bitwise batch invariance is not guaranteed: see README, Limitations.)"""
    rows = x.shape[0]
    if x.device.type == "cpu" and 0 < rows < 8 and x.dim() == 2:
        return F.linear(F.pad(x, (0, 0, 0, 8 - rows)), weight, bias)[:rows]
    return F.linear(x, weight, bias)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    _copy_checked(param.data, loaded, "weight")


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallel = SINGLE):
        super().__init__(in_features, out_features, bias, tp)

    def weight_loader(self, param, loaded, shard_id=None):
        _copy_checked(param.data, loaded, "replicated linear")


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallel = SINGLE):
        super().__init__(in_features, tp.shard(out_features, "output features"), bias, tp)
        self.full_out_features = out_features

    def weight_loader(self, param, loaded, shard_id=None):
        size = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp.rank * size, size), "column-parallel linear")


class MergedColumnParallelLinear(LinearBase):
    """Outputs ``[part_0 | part_1 | ...]``, each split over ranks; ``shard_id`` is the part's index."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TensorParallel = SINGLE):
        self.local_sizes = [tp.shard(s, "output features") for s in out_sizes]
        self.out_sizes = list(out_sizes)
        super().__init__(in_features, sum(self.local_sizes), bias, tp)

    def weight_loader(self, param, loaded, shard_id: int):
        if loaded.shape[0] != self.out_sizes[shard_id]:
            raise ValueError(f"merged linear part {shard_id}: expected {self.out_sizes[shard_id]} rows, "
                             f"got {tuple(loaded.shape)}")
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size),
                      f"merged linear part {shard_id}")

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One GEMM per part, each over its rows of the fused weight (views: no copy), outputs [N, part]."""
        outs, offset = [], 0
        for size in self.local_sizes:
            bias = self.bias.narrow(0, offset, size) if self.bias is not None else None
            outs.append(linear(x, self.weight.narrow(0, offset, size), bias))
            offset += size
        return outs


class QKVParallelLinear(LinearBase):
    """Outputs ``[q | k | v]`` for this rank's heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp: TensorParallel = SINGLE):
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        self.num_kv_heads = tp.shard(num_kv_heads, "num_key_value_heads")
        self.total_heads = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out, bias, tp)

    def weight_loader(self, param, loaded, shard_id: str):
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        expected = self.total_heads[shard_id] * self.head_dim
        if loaded.shape[0] != expected:
            raise ValueError(f"{shard_id}_proj: expected {expected} rows, got {tuple(loaded.shape)}")
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size),
                      f"{shard_id}_proj")


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallel = SINGLE):
        super().__init__(tp.shard(in_features, "input features"), out_features, bias, tp)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: whole, added once after the reduction
            _copy_checked(param.data, loaded, "row-parallel bias")
            return
        size = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.tp.rank * size, size), "row-parallel linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(linear(x, self.weight))
        if self.bias is not None:
            y = y + self.bias
        return y
