"""Learned per-consumer mixtures of a stack's feature maps (CrossMAE's inter-block feature maps).

Consumer ``j`` (a decoder block) reads ``norm_j(sum_i weight[j, i] * feats[i])``: a weighted sum of
the producer's outputs (encoder blocks) with its own LayerNorm, so each decoder block can draw on a
different depth of the encoder. The weights start at N(0, 1/k) for k inputs (as in the CrossMAE
paper's code); the per-consumer norm makes their scale irrelevant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class FeatureFusion(nn.Module):
    def __init__(self, num_inputs: int, num_outputs: int, dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_outputs, num_inputs) * num_inputs**-0.5)
        self.norms = nn.ModuleList([norm_layer(dim) for _ in range(num_outputs)])

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """feats: k tensors (N, T, D) -> num_outputs tensors (N, T, D)."""
        if len(feats) != self.weight.shape[1]:
            raise ValueError(f"expected {self.weight.shape[1]} feature maps, got {len(feats)}")
        stacked = torch.stack(list(feats), dim=0)  # (k, N, T, D)
        mixed = torch.einsum("jk,kntd->jntd", self.weight.to(stacked.dtype), stacked)
        return [norm(m) for norm, m in zip(self.norms, mixed.unbind(0), strict=True)]
