"""Mask generators of the MIM family, all with static shapes.

Every generator draws its randomness from uniform noise and ranks it with ``argsort`` (the same
scheme as MAE's ``random_masking``), so the number of masked tokens is the same for every sample
and every shape is known before the step runs: no boolean indexing, no ``nonzero``.

- :func:`block_mask` (SimMIM): masks square cells of ``mask_patch_size`` pixels, then upsamples the
  cell mask to the model's token grid. ``ceil(cells * ratio)`` cells are masked (SimMIM's rounding).
- :func:`tube_mask` (VideoMAE): one random spatial mask per clip, repeated over every tubelet slice
  of time. ``L_s - int(L_s * (1 - ratio))`` spatial positions are masked (MAE's rounding).
- :func:`mae_mask_keys` (MAE's sampling ablation, the MAE paper's Fig. 6): ``random``, ``block``
  (BEiT-style rectangles) or ``grid`` (keep one patch of every 2x2 cell), as ranking keys for MAE's
  ``random_masking``: ``argsort(keys)`` puts the ``len_keep`` kept patches first, so the kept and
  masked counts are MAE's for every mask type. It lives in :mod:`fastmae.models.masking` (the MAE
  and CrossMAE models use it; models import nothing of the methods) and is re-exported here.

Conventions: ``mask`` is 1 for masked tokens; token ids are row-major over the grid (and over
(t, h, w) for video).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmae.models.masking import MASK_TYPES, mae_mask_keys

__all__ = ["MASK_TYPES", "block_mask_geometry", "block_mask", "tube_mask", "mae_mask_keys"]


def block_mask_geometry(img_size: int | tuple[int, int], mask_patch_size: int, patch_size: int, mask_ratio: float):
    """Check a SimMIM mask setup and return ``(cell_grid, scale, n_masked_cells)``.

    Raises ValueError for a mask cell that is not a multiple of the model patch, an image that is not
    tiled by whole cells, or a ratio outside [0, 1).
    """
    H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if patch_size <= 0 or mask_patch_size <= 0:
        raise ValueError(f"patch sizes must be positive, got mask_patch_size={mask_patch_size}, patch_size={patch_size}")
    if mask_patch_size % patch_size:
        raise ValueError(
            f"mask_patch_size {mask_patch_size} must be a multiple of the model patch size {patch_size}"
        )
    if H % mask_patch_size or W % mask_patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by mask_patch_size {mask_patch_size}")
    if not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    cells = (H // mask_patch_size, W // mask_patch_size)
    n_masked = int(math.ceil(cells[0] * cells[1] * mask_ratio))
    return cells, mask_patch_size // patch_size, n_masked


def _cell_token_ids(cells: tuple[int, int], scale: int, device) -> Tensor:
    """(n_cells, scale*scale): the token ids covered by each cell, row-major inside the cell."""
    ch, cw = cells
    gw = cw * scale
    cy = torch.arange(ch, device=device).repeat_interleave(cw)
    cx = torch.arange(cw, device=device).repeat(ch)
    dy = torch.arange(scale, device=device).repeat_interleave(scale)
    dx = torch.arange(scale, device=device).repeat(scale)
    return (cy[:, None] * scale + dy[None, :]) * gw + cx[:, None] * scale + dx[None, :]


def block_mask(noise: Tensor, cells: tuple[int, int], scale: int, n_masked: int) -> tuple[Tensor, Tensor]:
    """SimMIM mask from per-cell noise.

    noise: (N, ch*cw) uniform; the ``n_masked`` cells with the smallest noise are masked.
    returns mask (N, L) float with 1 = masked, L = (ch*scale) * (cw*scale), and
    ids_masked (N, n_masked * scale**2) token ids of the masked tokens (cell by cell).
    """
    N = noise.shape[0]
    ids_cells = torch.argsort(noise, dim=1)[:, :n_masked]
    cell_tokens = _cell_token_ids(cells, scale, noise.device)
    ids_masked = cell_tokens[ids_cells].reshape(N, n_masked * scale * scale)
    L = cells[0] * cells[1] * scale * scale
    mask = torch.zeros(N, L, device=noise.device)
    mask.scatter_(1, ids_masked, 1.0)
    return mask, ids_masked


def tube_mask(noise: Tensor, t_slices: int, len_keep: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """VideoMAE tube masking from per-clip spatial noise.

    noise: (N, L_s) uniform over the spatial token grid; the ``len_keep`` smallest stay visible
    in every one of the ``t_slices`` time slices.
    returns
      ids_keep_s (N, len_keep), ids_masked_s (N, L_s - len_keep): spatial ids, the same for every slice;
      ids_keep (N, t_slices*len_keep), ids_masked (N, t_slices*(L_s - len_keep)): ids over the
        (t, h, w) token sequence (token id = t * L_s + s), time-major;
      mask (N, t_slices * L_s) float, 1 = masked.
    """
    N, Ls = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep_s, ids_masked_s = ids_shuffle[:, :len_keep], ids_shuffle[:, len_keep:]
    offsets = (torch.arange(t_slices, device=noise.device) * Ls).view(1, t_slices, 1)
    ids_keep = (offsets + ids_keep_s[:, None, :]).reshape(N, -1)
    ids_masked = (offsets + ids_masked_s[:, None, :]).reshape(N, -1)
    mask = torch.zeros(N, t_slices * Ls, device=noise.device)
    mask.scatter_(1, ids_masked, 1.0)
    return ids_keep_s, ids_masked_s, ids_keep, ids_masked, mask
