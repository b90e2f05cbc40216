"""Eager references for the SimMIM and VideoMAE losses, written from the papers' formulas.

These are the independent baselines of the family's parity tests: they work in the papers' own
layouts (SimMIM: a pixel mask over the image; VideoMAE: tubelets flattened as (t, p, q, c) with
``b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)``) and share no code with the models, which
reach the same numbers through fastmae's patch ops. Like ``fastmae.reference`` this module imports
nothing else of fastmae.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["simmim_pixel_mask", "simmim_l1_loss", "tubelet_patchify", "videomae_loss"]


def simmim_pixel_mask(cell_mask: Tensor, mask_patch_size: int) -> Tensor:
    """cell_mask: (N, ch, cw) with 1 = masked cell -> (N, 1, ch*s, cw*s) pixel mask (s = mask_patch_size)."""
    s = mask_patch_size
    return cell_mask.repeat_interleave(s, 1).repeat_interleave(s, 2).unsqueeze(1)


def simmim_l1_loss(x_rec: Tensor, imgs: Tensor, pixel_mask: Tensor, eps: float = 0.0) -> Tensor:
    """SimMIM: sum |x - x_rec| over masked pixels and channels / (masked pixels * C).

    x_rec, imgs: (N, C, H, W); pixel_mask: (N, 1, H, W) with 1 = masked. SimMIM's code uses eps = 1e-5.
    """
    C = imgs.shape[1]
    err = (x_rec.float() - imgs.float()).abs() * pixel_mask
    return err.sum() / (pixel_mask.sum() + eps) / C


def tubelet_patchify(videos: Tensor, tubelet: int, patch: int) -> Tensor:
    """videos: (N, C, T, H, W) -> (N, (T/t)*(H/p)*(W/p), t*p*p*C), tubelets row-major over (t, h, w),
    values flattened as (t, p, q, c): VideoMAE's rearrange."""
    N, C, T, H, W = videos.shape
    t, p = tubelet, patch
    x = videos.reshape(N, C, T // t, t, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # n, T', h, w, t, p, q, c
    return x.reshape(N, (T // t) * (H // p) * (W // p), t * p * p * C)


def videomae_loss(
    pred: Tensor, videos: Tensor, ids_masked: Tensor, tubelet: int, patch: int, target_norm: str = "channel",
    eps: float = 1e-6,
) -> Tensor:
    """MSE on masked tubelets, mean over values then tubelets.

    pred: (N, L_mask, t*p*p*C) in (t, p, q, c) order, row j <-> tubelet ids_masked[:, j]
    videos: (N, C, T, H, W) float; ids_masked: (N, L_mask)
    target_norm:
      "channel" (VideoMAE): per tubelet and channel, (x - mean) / (std + eps), unbiased std over the t*p*p values;
      "tubelet" (MAE's norm_pix): per tubelet, (x - mean) / sqrt(var + eps), unbiased var over all t*p*p*C values;
      "none": raw pixels.
    """
    C = videos.shape[1]
    target = tubelet_patchify(videos.float(), tubelet, patch)
    target = torch.stack([target[i, ids_masked[i]] for i in range(target.shape[0])])
    if target_norm == "channel":
        t = target.reshape(*target.shape[:2], -1, C)
        t = (t - t.mean(dim=-2, keepdim=True)) / (t.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
        target = t.reshape(target.shape)
    elif target_norm == "tubelet":
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, unbiased=True, keepdim=True) + eps).sqrt()
    elif target_norm != "none":
        raise ValueError(f"target_norm must be 'channel', 'tubelet' or 'none', got {target_norm!r}")
    return ((pred.float() - target) ** 2).mean()
