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
  masked counts are MAE's for every mask type.

Conventions: ``mask`` is 1 for masked tokens; token ids are row-major over the grid (and over
(t, h, w) for video).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MASK_TYPES", "MaskType", "block_mask_geometry", "block_mask", "tube_mask", "mae_mask_keys",
           "mask_type_problem"]


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


# BEiT's blockwise masking on a 14x14 grid: blocks of at least 16 patches, aspect ratio in [0.3, 1/0.3].
_BEIT_MIN_BLOCK = 16 / 196
_BLOCK_ASPECT = 0.3


def _random_keys(noise: Tensor, gh: int, gw: int, len_keep: int) -> Tensor:
    return noise


def _grid_keys(noise: Tensor, gh: int, gw: int, len_keep: int) -> Tensor:
    rows = torch.arange(gh, device=noise.device).view(gh, 1).expand(gh, gw)
    cols = torch.arange(gw, device=noise.device).view(1, gw).expand(gh, gw)
    keep = ((rows % 2 == 0) & (cols % 2 == 0)).reshape(1, gh * gw)
    return noise - 2.0 * keep.to(noise.dtype)


def _beit_block_keys(noise: Tensor, gh: int, gw: int, len_keep: int) -> Tensor:
    return _block_keys(noise, gh, gw, gh * gw - len_keep)


@dataclass(frozen=True)
class MaskType:
    """One MAE mask type: its key generator ``keys(noise, gh, gw, len_keep)`` and what it needs of the setup."""

    keys: Callable[[Tensor, int, int, int], Tensor]
    ratio: float | None = None  # the only mask ratio it supports (None: any)
    even_grid: bool = False  # the patch grid must have an even number of rows and columns
    needs: str = ""  # why, for the error


MASK_TYPES: dict[str, MaskType] = {
    "random": MaskType(_random_keys),
    "block": MaskType(_beit_block_keys),
    "grid": MaskType(_grid_keys, ratio=0.75, even_grid=True, needs="keeps one patch of every 2x2 cell"),
}


def mask_type_problem(mask_type: str, mask_ratio: float | None = None, grid: tuple[int, int] | None = None,
                      len_keep: int | None = None) -> str | None:
    """Why ``mask_type`` cannot run with what is known of the setup (a ratio, a patch grid, a kept count), or None.

    The one place the constraints of :data:`MASK_TYPES` are checked: the config, the models and
    :func:`mae_mask_keys` each pass what they know."""
    spec = MASK_TYPES.get(mask_type)
    if spec is None:
        return f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}"
    odd = spec.even_grid and grid is not None and (grid[0] % 2 or grid[1] % 2)
    off = spec.ratio is not None and (
        (mask_ratio is not None and mask_ratio != spec.ratio)
        or (len_keep is not None and grid is not None and len_keep != int(grid[0] * grid[1] * (1 - spec.ratio))))
    if not (odd or off):
        return None
    seen = (f"mask_ratio {mask_ratio}" if len_keep is None else f"{len_keep} patches kept") + (
        f", a {grid[0]}x{grid[1]} patch grid" if grid is not None else "")
    wants = ([f"mask_ratio {spec.ratio}"] if spec.ratio is not None else []) + (["an even patch grid"] if spec.even_grid else [])
    return f"mask_type={mask_type} {spec.needs}: it needs {' and '.join(wants)} (got {seen})"


def mae_mask_keys(noise: Tensor, grid: tuple[int, int], len_keep: int, mask_type: str = "random") -> Tensor:
    """Ranking keys (N, L) for MAE's ``random_masking``: the ``len_keep`` smallest keys stay visible.

    noise: (N, L) uniform in [0, 1), the only source of randomness (so a fixed noise gives a fixed mask).
    The generator is ``MASK_TYPES[mask_type].keys``:
    - ``random``: the noise itself (MAE).
    - ``grid``: patches at even row and even column are kept, one of every four; needs an even grid and
      ``len_keep = L / 4`` (mask ratio 0.75). The visible patches are the same for every sample.
    - ``block``: BEiT-style blocks with an exact count. ``K`` rectangles per sample are drawn from
      ``noise[:, :4K]`` (area uniform in [a_min, n_masked] with a_min = 16/196 of the grid as in BEiT,
      log-uniform aspect ratio in [0.3, 1/0.3], uniform position). Each patch gets the index of the
      first rectangle covering it; patches are masked in that order, the last rectangle reached from its
      centre outwards, until exactly ``L - len_keep`` are masked. If the rectangles cover fewer
      patches, the rest are masked at random (rare: K is chosen so their areas sum past the target).
    """
    N, L = noise.shape
    gh, gw = grid
    problem = mask_type_problem(mask_type, grid=(gh, gw), len_keep=len_keep)
    if problem:
        raise ValueError(problem)
    if gh * gw != L:
        raise ValueError(f"noise has {L} columns for a {gh}x{gw} patch grid")
    return MASK_TYPES[mask_type].keys(noise, gh, gw, len_keep)


def _block_keys(noise: Tensor, gh: int, gw: int, n_masked: int) -> Tensor:
    N, L = noise.shape
    a_min = max(1, round(_BEIT_MIN_BLOCK * L))
    a_max = max(a_min, n_masked)
    n_rect = max(1, min(L // 4, math.ceil(n_masked / a_min)))
    u = noise[:, : 4 * n_rect].reshape(N, n_rect, 4).to(torch.float32)
    area = a_min + u[..., 0] * (a_max - a_min)
    log_r = math.log(_BLOCK_ASPECT) + u[..., 1] * (-2 * math.log(_BLOCK_ASPECT))
    h = torch.sqrt(area * torch.exp(log_r)).round().clamp(1, gh)
    w = torch.sqrt(area / torch.exp(log_r)).round().clamp(1, gw)
    top = torch.minimum((u[..., 2] * (gh - h + 1)).floor(), gh - h)
    left = torch.minimum((u[..., 3] * (gw - w + 1)).floor(), gw - w)
    r = torch.arange(gh, device=noise.device, dtype=torch.float32).view(1, 1, gh, 1)
    c = torch.arange(gw, device=noise.device, dtype=torch.float32).view(1, 1, 1, gw)
    t, lf, hh, ww = (v.view(N, n_rect, 1, 1) for v in (top, left, h, w))
    covered = ((r >= t) & (r < t + hh) & (c >= lf) & (c < lf + ww)).reshape(N, n_rect, L)
    first = torch.where(covered.any(dim=1), covered.to(torch.int8).argmax(dim=1), n_rect)  # (N, L)
    # Distance to the centre of the patch's first rectangle, scaled into [0, 1): the partly used last
    # rectangle is filled from its centre outwards.
    k = first.clamp(max=n_rect - 1)
    ci = (top + (h - 1) / 2).gather(1, k)
    cj = (left + (w - 1) / 2).gather(1, k)
    hk, wk = h.gather(1, k), w.gather(1, k)
    rr = r.reshape(1, gh, 1).expand(1, gh, gw).reshape(1, L)
    cc = c.reshape(1, 1, gw).expand(1, gh, gw).reshape(1, L)
    dist = ((rr - ci) ** 2 + (cc - cj) ** 2) / ((hk**2 + wk**2) / 4 + 1)
    u_tie = noise.to(torch.float32)
    priority = torch.where(first < n_rect, first + 0.9 * dist + 0.01 * u_tie, n_rect + u_tie)
    return -priority
