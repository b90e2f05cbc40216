"""Patch embedding as a GEMM on already-extracted patches.

The parameter is the official ``Conv2d(C, D, p, stride=p)`` (so checkpoints
load unchanged), but the forward takes patches flattened in (p, q, c) order,
as the fused patchify+gather kernel writes them: only visible patches are
embedded and no full-image convolution runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def check_patch_grid(img_size: int | tuple[int, int], patch_size: int) -> None:
    """The image tiles into whole patches: the one check of it, for the layer and for a run config."""
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if sizes[0] % patch_size or sizes[1] % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by the patch size {patch_size}")


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        check_patch_grid(img_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, patches: Tensor) -> Tensor:
        """patches: (N, L', p*p*C) in (p, q, c) order -> (N, L', D)"""
        w = self.proj.weight  # (D, C, p, p)
        w = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        return F.linear(patches, w, self.proj.bias)
