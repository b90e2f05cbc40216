"""Tubelet embedding (VideoMAE) as a GEMM on already-extracted tubelets.

The parameter is the official ``Conv3d(C, D, (t, p, p), stride=(t, p, p))``; the forward takes tubelets
flattened in (p, q, t, c) order, as the patchify+gather op writes a clip whose frames are paired into
channels, so only visible tubelets are embedded and no full-clip convolution runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TubeletEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, tubelet_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, (tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, tubelets: Tensor) -> Tensor:
        """tubelets: (N, L', p*p*t*C) -> (N, L', D)"""
        w = self.proj.weight  # (D, C, t, p, q)
        w = w.permute(0, 3, 4, 2, 1).reshape(w.shape[0], -1)
        return F.linear(tubelets, w, self.proj.bias)
