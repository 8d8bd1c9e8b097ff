"""RMSNorm, computed in float32 like Hugging Face's, with a variant that first adds the residual.

With ``use_fused`` (set by the model runner on CUDA) the fused Triton kernel (``fused.add_rmsnorm``) does the
add and the norm in one pass; otherwise the PyTorch code below, whose float32 results equal transformers' bit
for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from rlserve.layers import fused


class RMSNorm(nn.Module):
    use_fused = False  # the model runner's choice (layers/fused.py)

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused and x.dim() == 2:
            return fused.add_rmsnorm(x, None, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual stream advanced by x, then normalised."""
        if self.use_fused:
            return fused.add_rmsnorm(x, residual, self.weight, self.eps), residual  # residual updated in place
        residual = residual + x
        return self.forward(residual), residual
