"""Eager PyTorch reference for every fused op, written from the MAE paper's formulas.

Each function here has the same signature as its fused twin in ``fastmae.ops``:
they are the CPU path of the library and the baselines of every parity test
and benchmark. This module imports nothing else of fastmae.

Conventions (official MAE):
- patch order is row-major over the (h, w) grid; a patch's pixels are
  flattened as (p, q, c), i.e. ``einsum('nchpwq->nhwpqc')``;
- ``mask`` is 1 for removed patches, 0 for kept ones;
- ``ids_shuffle = argsort(noise)``; the first ``len_keep`` are kept;
- norm-pix target: ``(x - mean) / sqrt(var + eps)`` with the unbiased variance
  over the p*p*C values of a patch.

Images come in two layouts: float ``(N, C, H, W)`` already normalized (what
PyTorch code holds), or uint8 ``(N, H, W, C)`` straight from the decoder (what
DALI delivers), normalized on the fly as ``(x - 255*mean) * (1 / (255*std))``
in fp32. The subtract-then-multiply form is used because both steps are
correctly rounded on every device and cannot be contracted into an FMA, so a
fused kernel can reproduce it bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "patchify",
    "unpatchify",
    "random_masking",
    "normalize_uint8",
    "patchify_gather",
    "unshuffle_scatter",
    "gather_queries",
    "masked_recon_loss",
]


def _grid(H: int, W: int, p: int) -> tuple[int, int]:
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    return H // p, W // p


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """imgs: (N, C, H, W) -> (N, L, p*p*C), patches row-major, pixels as (p, q, c)."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = _grid(H, W, p)
    x = imgs.reshape(N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: Tensor, patch_size: int, in_chans: int = 3, grid_size: tuple[int, int] | None = None) -> Tensor:
    """x: (N, L, p*p*C) -> imgs: (N, C, h*p, w*p). A square grid is assumed unless ``grid_size`` is given."""
    N, L, P = x.shape
    p, C = patch_size, in_chans
    if P != p * p * C:
        raise ValueError(f"patch dim {P} != patch_size**2 * in_chans = {p * p * C}")
    if grid_size is None:
        h = w = int(round(L**0.5))
        if h * w != L:
            raise ValueError(f"{L} patches do not form a square grid; pass grid_size")
    else:
        h, w = grid_size
    x = x.reshape(N, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, C, h * p, w * p)


def random_masking(noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of noise.

    noise: (N, L) -> ids_keep (N, len_keep), ids_restore (N, L), mask (N, L) float
    with 1 = removed, ids_shuffle (N, L).
    """
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(N, L, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask, ids_shuffle


def normalize_uint8(imgs: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """imgs: uint8 (N, H, W, C); mean, std: (C,) in [0, 1] units -> float32 (N, C, H, W)."""
    shift = mean.to(torch.float32) * 255.0
    scale = 1.0 / (std.to(torch.float32) * 255.0)
    x = (imgs.to(torch.float32) - shift) * scale
    return x.permute(0, 3, 1, 2)


def _as_nchw_float(imgs: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    if imgs.dtype == torch.uint8:
        if mean is None or std is None:
            raise ValueError("uint8 (N, H, W, C) images need per-channel mean and std")
        return normalize_uint8(imgs, mean, std)
    return imgs


def patchify_gather(
    imgs: Tensor,
    ids_keep: Tensor,
    patch_size: int,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Visible patches of each image (K1).

    imgs: float (N, C, H, W), or uint8 (N, H, W, C) normalized with mean/std (C,)
    ids_keep: (N, L_vis) int64 patch indices
    returns (N, L_vis, p*p*C) in ``out_dtype`` (default: fp32 for uint8 input, else imgs.dtype)
    """
    x = _as_nchw_float(imgs, mean, std)
    if out_dtype is None:
        out_dtype = x.dtype
    patches = patchify(x, patch_size)
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.gather(patches, 1, idx).to(out_dtype)


def unshuffle_scatter(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor) -> Tensor:
    """Decoder input (K2): put visible tokens back in place, fill the rest with the mask token, add positions.

    x: (N, 1+L_vis, D) with the cls token first
    mask_token: (D,)
    ids_restore: (N, L)
    pos_embed: (1, 1+L, D)
    returns (N, 1+L, D)
    """
    N, n_tok, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).expand(N, L + 1 - n_tok, D).to(x.dtype)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


def gather_queries(mask_token: Tensor, pos_embed: Tensor, ids: Tensor) -> Tensor:
    """CrossMAE decoder queries: the mask token plus the position of each patch to predict.

    mask_token: (D,)
    pos_embed: (1, 1+L, D) with the cls slot at row 0, so patch l's position is row l + 1
    ids: (N, L_t) patch ids in [0, L), e.g. a subset of the masked ones
    returns (N, L_t, D) in the promoted dtype of mask_token and pos_embed
    """
    N, L_t = ids.shape
    pos = torch.index_select(pos_embed[0, 1:], 0, ids.reshape(-1)).reshape(N, L_t, -1)
    return mask_token + pos


def masked_recon_loss(
    pred: Tensor,
    imgs: Tensor,
    ids_masked: Tensor,
    patch_size: int,
    norm_pix: bool = True,
    loss_type: str = "mse",
    mean: Tensor | None = None,
    std: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """MAE's reconstruction loss on masked patches (K3), accumulated in fp32.

    pred: (N, L, P) predictions for every patch, or (N, L_mask, P) for the
          masked ones only, row j <-> patch ids_masked[:, j]
    imgs: float (N, C, H, W), or uint8 (N, H, W, C) with mean/std (C,)
    ids_masked: (N, L_mask) indices of the removed patches
    loss_type: "mse" (MAE) or "l1" (SimMIM)
    returns a float32 scalar: mean over patch dims, then over masked patches.
    """
    if loss_type not in ("mse", "l1"):
        raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")
    target = patchify(_as_nchw_float(imgs, mean, std).to(torch.float32), patch_size)
    P = target.shape[-1]
    idx = ids_masked.unsqueeze(-1).expand(-1, -1, P)
    target = torch.gather(target, 1, idx)
    if norm_pix:
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mu) / (var + eps) ** 0.5
    if pred.shape[1] != ids_masked.shape[1]:
        pred = torch.gather(pred, 1, idx)
    err = pred.to(torch.float32) - target
    per_patch = (err * err if loss_type == "mse" else err.abs()).mean(dim=-1)
    return per_patch.mean()


def masked_recon_loss_official(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
    """The official MAE ``forward_loss`` formula (weights by ``mask`` over all patches).

    Kept for tests: an independent second statement of K3's semantics.
    """
    target = patchify(imgs, patch_size)
    if norm_pix:
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mu) / (var + 1.0e-6) ** 0.5
    loss = F.mse_loss(pred, target, reduction="none").mean(dim=-1)
    return (loss * mask).sum() / mask.sum()
