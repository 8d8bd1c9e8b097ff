"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous slice of the vocabulary (padded so that the slices are equal). The embedding
looks up the tokens it owns and sums over ranks; the LM head computes its slice of the logits and gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlserve.distributed.parallel import SINGLE, TensorParallel
from rlserve.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.part = (vocab_size + tp.size - 1) // tp.size
        self.start = tp.rank * self.part
        self.end = min(self.start + self.part, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.part, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding: expected shape ({self.vocab_size}, {param.shape[1]}), "
                             f"got {tuple(loaded.shape)}")
        rows = self.end - self.start
        param.data[:rows].copy_(loaded[self.start:self.end])

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        owned = (token_ids >= self.start) & (token_ids < self.end)
        local = torch.where(owned, token_ids - self.start, 0)
        x = F.embedding(local, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the whole vocabulary; may share its weight with the embedding (tied)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, V]
        logits = linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last_dim(logits)
        return logits[:, :self.vocab_size]
