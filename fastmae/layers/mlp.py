"""Transformer MLP: fc1 -> GELU -> fc2 (names match timm and the official MAE)."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, T, D) -> (N, T, D)"""
        return self.fc2(self.act(self.fc1(x)))
