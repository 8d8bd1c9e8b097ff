"""SiLU-and-multiply on a fused [gate | up] projection (one Triton kernel when the model runner sets ``use_fused``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlserve.layers import fused


class SiluAndMul(nn.Module):
    use_fused = False  # the model runner's choice (layers/fused.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 2I] -> [N, I]
        if self.use_fused:
            return fused.silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def parts(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [N, I] each -> [N, I]
        if self.use_fused:
            return fused.silu_mul_parts(gate, up)
        return F.silu(gate) * up
