"""Stochastic depth per sample (used by fine-tuning; identity at rate 0 and in eval)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
