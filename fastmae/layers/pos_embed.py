"""Fixed sin-cos position embeddings (2-D as in MAE and MoCo v3, 1-D as in VideoMAE).

Learned tables are resized with timm's ``resample_abs_pos_embed``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(embed_dim: int, pos: Tensor) -> Tensor:
    """pos: (M,) float64 -> (M, embed_dim): sin of pos * omega in the first half, cos in the second."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).to(torch.float64) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> Tensor:
    """Table of shape (gh*gw [+1], embed_dim) in float32, rows in row-major patch order.

    The first half of the channels encodes the column index and the second
    half the row index: the official MAE builds its grid with
    ``meshgrid(w, h)`` and embeds ``grid[0]`` first, and checkpoints depend on it.
    A zero row is prepended for the cls token.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dim divisible by 4, got {embed_dim}")
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.to(torch.float32)


def sinusoid_table(n_position: int, dim: int) -> Tensor:
    """(n_position, dim) float32: angle pos / 10000**(2*(j//2)/dim), sin on even j and cos on odd j (VideoMAE)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32)

