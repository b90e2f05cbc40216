"""Fixed sin-cos position embeddings (2-D as in MAE and MoCo v3, 1-D as in VideoMAE) and resizing of learned tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def resize_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """Bicubic resize of a learned table (1, num_prefix + gh*gw, D) to a new square-or-not grid.

    The old grid is assumed square (as in every MAE/timm checkpoint).
    """
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n_old, D = grid.shape[1], grid.shape[2]
    g_old = int(round(n_old**0.5))
    if g_old * g_old != n_old:
        raise ValueError(f"cannot resize a position table of {n_old} non-square grid tokens")
    if (g_old, g_old) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, g_old, g_old, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
