"""K1: fused patchify + (uint8) normalize + gather of the visible patches.

One program per visible patch ``(n, j)``: it reads the patch id ``ids_keep[n, j]``
and copies the ``p*p*C`` pixels of that patch, flattened as ``(p, q, c)``, into
row ``j`` of the output. Masked patches are never read. uint8 ``(N, H, W, C)``
input is normalized on the way as ``(x - shift[c]) * scale[c]`` in fp32, with
``shift``/``scale`` computed on the host by the very tensor ops the reference
uses, so the result is bit-identical (a subtraction then a multiplication: no
FMA contraction is possible).

Images are addressed through their strides, so NCHW, NHWC and channels-last
tensors all work without a copy; the channel stride tells the kernel where a
pixel's channels are.

Backward (float images only): the patch gradient is scattered back into a
zero image; patches do not overlap, so it is a plain store, no atomics. This
assumes the ids of a row are distinct, as ``argsort`` makes them (the
reference's ``gather`` backward would add duplicates; checking on the device
would cost a sort or a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, block_config, check_ids, image_geometry, norm_constants, patch_offsets

__all__ = ["patchify_gather_fwd", "patchify_gather_bwd"]


@triton.jit
def _patchify_gather_fwd_kernel(
    img_ptr,  # (N, C, H, W) float or (N, H, W, C) uint8, any strides
    ids_ptr,  # (N, L_vis) int
    shift_ptr,  # (C,) fp32, uint8 input only
    scale_ptr,  # (C,) fp32, uint8 input only
    out_ptr,  # (N, L_vis, P) contiguous
    L_vis,
    w,
    s_n,
    s_c,
    s_h,
    s_w,
    s_idn,
    s_idl,
    P: tl.constexpr,
    C: tl.constexpr,
    PATCH: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    l = tl.load(ids_ptr + n * s_idn + j * s_idl).to(tl.int64)
    offs, c, m = patch_offsets(l, w, s_c, s_h, s_w, P, C, PATCH, BLOCK_P)
    x = tl.load(img_ptr + n * s_n + offs, mask=m, other=0)
    if NORMALIZE:
        shift = tl.load(shift_ptr + c, mask=m, other=0.0)
        scale = tl.load(scale_ptr + c, mask=m, other=0.0)
        x = (x.to(tl.float32) - shift) * scale
    out = out_ptr + (n * L_vis + j) * P + tl.arange(0, BLOCK_P)
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _patchify_gather_bwd_kernel(
    grad_out_ptr,  # (N, L_vis, P) contiguous
    ids_ptr,  # (N, L_vis) int
    grad_img_ptr,  # (N, C, H, W) contiguous, zero-filled
    L_vis,
    w,
    s_n,
    s_c,
    s_h,
    s_w,
    s_idn,
    s_idl,
    P: tl.constexpr,
    C: tl.constexpr,
    PATCH: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    l = tl.load(ids_ptr + n * s_idn + j * s_idl).to(tl.int64)
    g = tl.load(grad_out_ptr + (n * L_vis + j) * P + tl.arange(0, BLOCK_P), mask=tl.arange(0, BLOCK_P) < P)
    offs, c, m = patch_offsets(l, w, s_c, s_h, s_w, P, C, PATCH, BLOCK_P)
    tl.store(grad_img_ptr + n * s_n + offs, g.to(grad_img_ptr.dtype.element_ty), mask=m)


def patchify_gather_fwd(
    imgs: Tensor,
    ids_keep: Tensor,
    patch_size: int,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """imgs: (N, C, H, W) float or (N, H, W, C) uint8; ids_keep: (N, L_vis) -> (N, L_vis, p*p*C)."""
    N, C, h, w, (s_n, s_c, s_h, s_w) = image_geometry(imgs, patch_size)
    check_ids(ids_keep, N, imgs, "ids_keep")
    normalize = imgs.dtype == torch.uint8
    if out_dtype is None:
        out_dtype = torch.float32 if normalize else imgs.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    P = patch_size * patch_size * C
    block, num_warps = block_config(P)
    if normalize:
        shift, scale = norm_constants(imgs, mean, std, C)
    else:
        shift = scale = imgs  # never read: NORMALIZE is a compile-time False
    L_vis = ids_keep.shape[1]
    out = torch.empty(N, L_vis, P, device=imgs.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    _patchify_gather_fwd_kernel[(N, L_vis)](
        imgs, ids_keep, shift, scale, out, L_vis, w, s_n, s_c, s_h, s_w, *ids_keep.stride(),
        P=P, C=C, PATCH=patch_size, NORMALIZE=normalize, BLOCK_P=block, num_warps=num_warps,
    )
    return out


def patchify_gather_bwd(grad_out: Tensor, ids_keep: Tensor, patch_size: int, img_shape: list[int],
                        img_dtype: torch.dtype) -> Tensor:
    """grad_out: (N, L_vis, p*p*C) -> grad of the float (N, C, H, W) images, zero at masked pixels."""
    N, C, H, W = img_shape
    grad_img = torch.zeros(N, C, H, W, device=grad_out.device, dtype=img_dtype)
    P = patch_size * patch_size * C
    if tuple(grad_out.shape) != (N, ids_keep.shape[1], P):
        raise ValueError(f"grad_out must be {(N, ids_keep.shape[1], P)}, got {tuple(grad_out.shape)}")
    if grad_out.numel() == 0:
        return grad_img
    grad_out = grad_out.contiguous()
    block, num_warps = block_config(P)
    s_n, s_c, s_h, s_w = grad_img.stride()
    _patchify_gather_bwd_kernel[(N, ids_keep.shape[1])](
        grad_out, ids_keep, grad_img, ids_keep.shape[1], W // patch_size, s_n, s_c, s_h, s_w, *ids_keep.stride(),
        P=P, C=C, PATCH=patch_size, BLOCK_P=block, num_warps=num_warps,
    )
    return grad_img
