"""MAE's patch sampling strategies (the MAE paper's Fig. 6) as ranking keys with static shapes.

MAE keeps the ``len_keep`` patches with the smallest noise (``argsort(noise)``). The other strategies
turn the same uniform noise into keys whose ``argsort`` puts their kept patches first, so
``random_masking(keys, len_keep)`` gives every mask type MAE's kept and masked counts, per sample,
with no boolean indexing and no ``nonzero``. Imports only torch (the models use it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MASK_TYPES", "mae_mask_keys"]

MASK_TYPES = ("random", "block", "grid")

# BEiT's blockwise masking on a 14x14 grid: blocks of at least 16 patches, aspect ratio in [0.3, 1/0.3].
_BEIT_MIN_BLOCK = 16 / 196
_BLOCK_ASPECT = 0.3


def mae_mask_keys(noise: Tensor, grid: tuple[int, int], len_keep: int, mask_type: str = "random") -> Tensor:
    """Ranking keys (N, L) for MAE's ``random_masking``: the ``len_keep`` smallest keys stay visible.

    noise: (N, L) uniform in [0, 1), the only source of randomness (so a fixed noise gives a fixed mask).
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
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    N, L = noise.shape
    gh, gw = grid
    if gh * gw != L:
        raise ValueError(f"noise has {L} columns for a {gh}x{gw} patch grid")
    if mask_type == "random":
        return noise
    rows = torch.arange(gh, device=noise.device).view(gh, 1).expand(gh, gw)
    cols = torch.arange(gw, device=noise.device).view(1, gw).expand(gh, gw)
    if mask_type == "grid":
        keep = ((rows % 2 == 0) & (cols % 2 == 0)).reshape(1, L)
        if gh % 2 or gw % 2 or len_keep != L // 4:
            raise ValueError(
                f"mask_type=grid keeps one patch of every 2x2 cell: it needs an even patch grid and mask_ratio 0.75 "
                f"(grid {gh}x{gw}, {len_keep} of {L} kept)"
            )
        return noise - 2.0 * keep.to(noise.dtype)
    return _block_keys(noise, gh, gw, L - len_keep)


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
