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

__all__ = [
    "MAX_BLOCK_P",
    "FLOAT_DTYPES",
    "block_config",
    "patchify_gather_fwd",
    "patchify_gather_bwd",
    "patchify_gather",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A patch lives in the registers of one program; beyond this it would spill.
MAX_BLOCK_P = 4096
MIN_BLOCK_P = 16


def block_config(P: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps) the launchers use for a patch of P values."""
    block = max(MIN_BLOCK_P, triton.next_power_of_2(P))
    if block > MAX_BLOCK_P:
        raise ValueError(f"patch dim {P} exceeds the kernel limit {MAX_BLOCK_P}")
    num_warps = 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8
    return block, num_warps


@triton.jit
def _patch_offsets(
    l,  # scalar patch id in [0, h*w)
    w,  # patches per image row
    s_c,
    s_h,
    s_w,  # strides of the image (elements)
    P: tl.constexpr,
    C: tl.constexpr,
    PATCH: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    k = tl.arange(0, BLOCK_P)
    qc = PATCH * C
    pi = k // qc
    qi = (k // C) % PATCH
    c = k % C
    row = (l // w) * PATCH + pi
    col = (l % w) * PATCH + qi
    return row * s_h + col * s_w + c * s_c, c, k < P


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
    offs, c, m = _patch_offsets(l, w, s_c, s_h, s_w, P, C, PATCH, BLOCK_P)
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
    offs, c, m = _patch_offsets(l, w, s_c, s_h, s_w, P, C, PATCH, BLOCK_P)
    tl.store(grad_img_ptr + n * s_n + offs, g.to(grad_img_ptr.dtype.element_ty), mask=m)


def _check_ids(ids: Tensor, N: int, imgs: Tensor, name: str) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"{name} must be a (N, L) tensor with N = {N}, got {getattr(ids, 'shape', type(ids))}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {ids.dtype}")
    if ids.device != imgs.device:
        raise ValueError(f"{name} is on {ids.device} but imgs are on {imgs.device}")


def image_geometry(imgs: Tensor, patch_size: int) -> tuple[int, int, int, int, tuple[int, int, int, int]]:
    """(N, C, h, w, (s_n, s_c, s_h, s_w)) of float NCHW or uint8 NHWC images; raises on bad input."""
    if not isinstance(imgs, Tensor) or imgs.dim() != 4:
        raise ValueError(f"imgs must be a 4-D tensor, got {getattr(imgs, 'shape', type(imgs))}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if imgs.dtype == torch.uint8:
        N, H, W, C = imgs.shape
        s_n, s_h, s_w, s_c = imgs.stride()
    elif imgs.dtype in FLOAT_DTYPES:
        N, C, H, W = imgs.shape
        s_n, s_c, s_h, s_w = imgs.stride()
    else:
        raise TypeError(f"imgs must be uint8 (N, H, W, C) or fp32/bf16/fp16 (N, C, H, W), got {imgs.dtype}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {patch_size}")
    return N, C, H // patch_size, W // patch_size, (s_n, s_c, s_h, s_w)


def norm_constants(imgs: Tensor, mean: Tensor | None, std: Tensor | None, C: int) -> tuple[Tensor, Tensor]:
    """fp32 (shift, scale) of the uint8 normalization, computed exactly as ``reference.normalize_uint8``."""
    if mean is None or std is None:
        raise ValueError("uint8 (N, H, W, C) images need per-channel mean and std")
    for name, t in (("mean", mean), ("std", std)):
        if not isinstance(t, Tensor) or t.shape != (C,):
            raise ValueError(f"{name} must be a ({C},) tensor, got {getattr(t, 'shape', type(t))}")
        if t.device != imgs.device:
            raise ValueError(f"{name} is on {t.device} but imgs are on {imgs.device}")
    shift = mean.to(torch.float32) * 255.0
    scale = 1.0 / (std.to(torch.float32) * 255.0)
    return shift.contiguous(), scale.contiguous()


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
    _check_ids(ids_keep, N, imgs, "ids_keep")
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


class PatchifyGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, imgs, ids_keep, patch_size, mean, std, out_dtype):
        out = patchify_gather_fwd(imgs, ids_keep, patch_size, mean, std, out_dtype)
        ctx.save_for_backward(ids_keep)
        ctx.patch_size = patch_size
        ctx.img_shape = list(imgs.shape)
        ctx.img_dtype = imgs.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (ids_keep,) = ctx.saved_tensors
        grad = patchify_gather_bwd(grad_out, ids_keep, ctx.patch_size, ctx.img_shape, ctx.img_dtype)
        return grad, None, None, None, None, None


def patchify_gather(
    imgs: Tensor,
    ids_keep: Tensor,
    patch_size: int,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Eager autograd entry point (same signature as ``fastmae.reference.patchify_gather``)."""
    return PatchifyGatherFunction.apply(imgs, ids_keep, patch_size, mean, std, out_dtype)
