"""SiLU-and-multiply on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 2I] -> [N, I]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
