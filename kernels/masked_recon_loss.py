"""K3: MAE's masked reconstruction loss and its gradient.

Forward: one program per masked patch ``(n, j)``. It reads the patch
``ids_masked[n, j]`` straight from the images (uint8 ``(N, H, W, C)`` normalized
on the fly exactly as in K1, or float ``(N, C, H, W)``), builds the norm-pix
target in registers (mean and unbiased variance over the ``p*p*C`` values,
``+ eps``), reads the matching prediction row and writes the patch's mean
squared (or absolute) error in fp32. The loss is the mean of those per-patch
values, the same final reduction as the reference. Nothing else is written: the
forward is the same under ``no_grad``.

Backward: one program per row of the gradient. A masked row recomputes the
target from the images, reads the upstream gradient of the loss from device
memory (no host sync) and writes
``2 * ((g / n_masked) / P) * err`` (MSE) or ``((g / n_masked) / P) * sign(err)`` (L1),
the reference's autograd chain step for step, rounded once to pred's dtype. When
``pred`` covers all ``L`` patches, rows of visible patches are written as zeros by
the same launch, told apart by a ``(N, L)`` uint8 mask scattered from the ids:
every gradient element is written exactly once, no zero-fill pass.

Why recompute instead of saving the gradient: the alternative writes ``d loss / d pred``
for a unit upstream gradient compactly, ``(N, L_mask, P)``, in the forward and scales
it into the output in the backward. Bytes per masked row for ``P = 768`` (forward +
backward; ids, per-patch losses and the zero rows cost the same either way):

- uint8 images, bf16 pred (the training path: DALI images, autocast decoder):
  recompute (1536 + 768) + (1536 + 768 + 1536) = 6144; save (2304 + 1536) + (1536 + 1536) = 6912;
- fp32 images, fp32 pred: 6144 + 9216 = 15360 both ways;
- fp32 images, bf16 pred: recompute 4608 + 6144 = 10752; save 6144 + 3072 = 9216.

Recomputing moves 11% fewer bytes on the training path, ties in fp32, and keeps no
``(N, L_mask, P)`` buffer alive between forward and backward; it loses 14% with fp32
images and bf16 predictions, which the training step does not produce (both loaders
deliver uint8 images).

The ids of a row must be distinct, as ``argsort`` makes them (the reference's
``gather`` backward would add duplicates; checking would cost a sort or a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, block_config, check_ids, image_geometry, norm_constants, patch_offsets

__all__ = ["masked_recon_loss_fwd", "masked_recon_loss_bwd"]


@triton.jit
def _patch_error(
    pred_row_ptr,  # (P,) one prediction row, unit stride
    img_ptr,  # (C, H, W) float or (H, W, C) uint8: one image, any strides
    shift_ptr,  # (C,) fp32, uint8 input only
    scale_ptr,  # (C,) fp32, uint8 input only
    l,  # patch id
    valid,  # scalar: False loads nothing and gives a zero error
    w,
    s_c,
    s_h,
    s_w,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    PATCH: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """fp32 ``pred - target`` of one patch (BLOCK_P,), zero beyond P; the target is built in registers."""
    offs, c, m = patch_offsets(l, w, s_c, s_h, s_w, P, C, PATCH, BLOCK_P)
    m = m & valid
    x = tl.load(img_ptr + offs, mask=m, other=0).to(tl.float32)
    if NORMALIZE:
        shift = tl.load(shift_ptr + c, mask=m, other=0.0)
        scale = tl.load(scale_ptr + c, mask=m, other=0.0)
        x = (x - shift) * scale
    if NORM_PIX:
        mu = tl.sum(x, axis=0) / P
        xc = tl.where(m, x - mu, 0.0)
        var = tl.sum(xc * xc, axis=0) / (P - 1)
        target = tl.div_rn(xc, tl.sqrt_rn(var + eps))
    else:
        target = x
    pr = tl.load(pred_row_ptr + tl.arange(0, BLOCK_P), mask=m, other=0.0).to(tl.float32)
    return tl.where(m, pr - target, 0.0)


@triton.jit
def _masked_recon_loss_fwd_kernel(
    pred_ptr,  # (N, L_pred, P), unit stride on P; L_pred = L (all patches) or L_mask
    img_ptr,  # (N, C, H, W) float or (N, H, W, C) uint8, any strides
    ids_ptr,  # (N, L_mask) int
    shift_ptr,  # (C,) fp32, uint8 input only
    scale_ptr,  # (C,) fp32, uint8 input only
    loss_ptr,  # (N, L_mask) fp32: per-patch loss
    L_mask,
    w,
    s_n,
    s_c,
    s_h,
    s_w,
    s_idn,
    s_idl,
    s_pn,
    s_pl,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    PATCH: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    L1: tl.constexpr,
    PRED_FULL: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    l = tl.load(ids_ptr + n * s_idn + j * s_idl).to(tl.int64)
    prow = l if PRED_FULL else j
    err = _patch_error(pred_ptr + n * s_pn + prow * s_pl, img_ptr + n * s_n, shift_ptr, scale_ptr, l, j >= 0,
                       w, s_c, s_h, s_w, eps, P, C, PATCH, NORMALIZE, NORM_PIX, BLOCK_P)
    if L1:
        per_patch = tl.sum(tl.abs(err), axis=0) / P
    else:
        per_patch = tl.sum(err * err, axis=0) / P
    tl.store(loss_ptr + n * L_mask + j, per_patch)


@triton.jit
def _masked_recon_loss_bwd_kernel(
    grad_loss_ptr,  # (1,) fp32: upstream gradient of the loss
    pred_ptr,  # (N, L_pred, P), unit stride on P
    img_ptr,  # (N, C, H, W) float or (N, H, W, C) uint8, any strides
    ids_ptr,  # (N, L_mask) int; read when not PRED_FULL
    is_masked_ptr,  # (N, L_pred) uint8, 1 = masked patch; read when PRED_FULL
    shift_ptr,  # (C,) fp32, uint8 input only
    scale_ptr,  # (C,) fp32, uint8 input only
    grad_ptr,  # (N, L_pred, P) contiguous, pred dtype
    L_pred,
    w,
    s_n,
    s_c,
    s_h,
    s_w,
    s_idn,
    s_idl,
    s_pn,
    s_pl,
    count,  # fp32 N * L_mask
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    PATCH: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    L1: tl.constexpr,
    PRED_FULL: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)  # row of pred and of the gradient
    if PRED_FULL:
        l = r
        masked = tl.load(is_masked_ptr + n * L_pred + r) != 0
    else:
        l = tl.load(ids_ptr + n * s_idn + r * s_idl).to(tl.int64)
        masked = r >= 0
    err = _patch_error(pred_ptr + n * s_pn + r * s_pl, img_ptr + n * s_n, shift_ptr, scale_ptr, l, masked,
                       w, s_c, s_h, s_w, eps, P, C, PATCH, NORMALIZE, NORM_PIX, BLOCK_P)
    # The reference's chain: mean over patches (/ count), mean over values (/ P), then the square or abs.
    coef = tl.div_rn(tl.div_rn(tl.load(grad_loss_ptr), count), P * 1.0)
    if L1:
        g = tl.where(err > 0, coef, tl.where(err < 0, -coef, 0.0))
    else:
        g = 2.0 * (coef * err)
    k = tl.arange(0, BLOCK_P)
    tl.store(grad_ptr + (n * L_pred + r) * P + k, g.to(grad_ptr.dtype.element_ty), mask=k < P)


def _prepare(pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std) -> tuple:
    """Checks the inputs; returns (pred with unit stride on P, geometry, shift, scale, launch constexprs)."""
    if loss_type not in ("mse", "l1"):
        raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")
    N, C, h, w, strides = image_geometry(imgs, patch_size)
    P = patch_size * patch_size * C
    if not isinstance(pred, Tensor) or pred.dim() != 3 or pred.shape[0] != N or pred.shape[2] != P:
        raise ValueError(f"pred must be (N, L or L_mask, P) with N = {N}, P = {P}, got {getattr(pred, 'shape', None)}")
    if pred.dtype not in FLOAT_DTYPES:
        raise TypeError(f"pred must be fp32, bf16 or fp16, got {pred.dtype}")
    if pred.device != imgs.device:
        raise ValueError(f"pred is on {pred.device} but imgs are on {imgs.device}")
    check_ids(ids_masked, N, imgs, "ids_masked")
    L_mask = ids_masked.shape[1]
    L_pred = pred.shape[1]
    if L_pred not in (h * w, L_mask):
        raise ValueError(f"pred has {L_pred} rows; expected all {h * w} patches or the {L_mask} masked ones")
    if norm_pix and P < 2:
        raise ValueError("norm_pix needs at least 2 values per patch (unbiased variance)")
    if L_mask == 0 or N == 0:
        raise ValueError("masked_recon_loss needs at least one masked patch")
    normalize = imgs.dtype == torch.uint8
    if normalize:
        shift, scale = norm_constants(imgs, mean, std, C)
    else:
        shift = scale = imgs  # never read: NORMALIZE is a compile-time False
    if pred.stride(2) != 1:
        pred = pred.contiguous()
    block, num_warps = block_config(P)
    const = dict(P=P, C=C, PATCH=patch_size, NORMALIZE=normalize, NORM_PIX=bool(norm_pix), L1=loss_type == "l1",
                 PRED_FULL=L_pred != L_mask, BLOCK_P=block, num_warps=num_warps)
    return pred, (N, L_mask, L_pred, w, strides), shift, scale, const


def masked_recon_loss_fwd(
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
    """The loss, an fp32 scalar. pred: (N, L, P) or (N, L_mask, P); imgs: float (N, C, H, W) or uint8 (N, H, W, C)
    with mean/std (C,); ids_masked: (N, L_mask)."""
    pred, (N, L_mask, _, w, (s_n, s_c, s_h, s_w)), shift, scale, const = _prepare(
        pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std
    )
    per_patch = torch.empty(N, L_mask, device=pred.device, dtype=torch.float32)
    _masked_recon_loss_fwd_kernel[(N, L_mask)](
        pred, imgs, ids_masked, shift, scale, per_patch,
        L_mask, w, s_n, s_c, s_h, s_w, *ids_masked.stride(), pred.stride(0), pred.stride(1), eps, **const,
    )
    return per_patch.mean()


def masked_recon_loss_bwd(
    grad_loss: Tensor,
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
    """d loss / d pred for the upstream gradient ``grad_loss`` (a scalar tensor, read on the device), in pred's
    shape (contiguous) and dtype; rows of visible patches are zero."""
    dtype = pred.dtype
    pred, (N, L_mask, L_pred, w, (s_n, s_c, s_h, s_w)), shift, scale, const = _prepare(
        pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std
    )
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must be a scalar, got shape {tuple(grad_loss.shape)}")
    g = grad_loss.reshape(1).to(torch.float32)
    if const["PRED_FULL"]:
        is_masked = torch.zeros(N, L_pred, device=pred.device, dtype=torch.uint8)
        is_masked.scatter_(1, ids_masked.to(torch.int64), 1)
    else:
        is_masked = g  # never read: PRED_FULL is a compile-time False
    grad = torch.empty(N, L_pred, pred.shape[2], device=pred.device, dtype=dtype)
    _masked_recon_loss_bwd_kernel[(N, L_pred)](
        g, pred, imgs, ids_masked, is_masked, shift, scale, grad,
        L_pred, w, s_n, s_c, s_h, s_w, *ids_masked.stride(), pred.stride(0), pred.stride(1), float(N * L_mask), eps,
        **const,
    )
    return grad
