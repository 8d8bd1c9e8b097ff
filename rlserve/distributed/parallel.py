"""Tensor-parallel context: which shard this process holds and how shards talk.

Passed explicitly to the model's layers (no module-level state). With ``size == 1`` every collective is a
no-op, so the same model code runs alone on a CPU and sharded over GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when size > 1

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} outside [0, {self.size})")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., n * size], ranks in order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """The group's first rank's ``x`` on every rank, in place. ``src`` is a global rank: the group's rank 0
        is looked up, so that a group other than the default one (whose rank 0 is 0) is right too."""
        if self.size > 1:
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            dist.broadcast(x, src=src, group=self.group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value`` (e.g. the KV blocks all ranks can hold)."""
        if self.size == 1:
            return value
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def shard(self, total: int, what: str) -> int:
        if total % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} must divide {what} ({total})")
        return total // self.size


SINGLE = TensorParallel()
