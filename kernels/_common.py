"""Helpers shared by the kernel modules: dtypes, block sizes, input checks, image geometry,
the uint8 normalization constants and the patch addressing used inside kernels.

A private module of the kernels package: its siblings import these public names from here,
never each other's.
"""

from __future__ import annotations

if __package__ != "fastmae.kernels":
    # The folder has no __init__.py so that the repository root never shadows PyPI's `kernels` (which
    # transformers imports); without that package installed, `import kernels` would find this folder as an
    # empty namespace. Refuse to run under any name but the one the package installs.
    raise ImportError(f"{__name__}: fastmae's kernels import only as fastmae.kernels, not as {__package__!r}")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = [
    "FLOAT_DTYPES",
    "MAX_BLOCK",
    "block_config",
    "check_ids",
    "image_geometry",
    "norm_constants",
    "patch_offsets",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One row (a patch, a token) lives in the registers of one program; beyond this it would spill.
MAX_BLOCK = 4096
MIN_BLOCK = 16


def block_config(n: int, what: str = "patch dim") -> tuple[int, int]:
    """(BLOCK, num_warps) for a program that holds one row of ``n`` values in registers."""
    block = max(MIN_BLOCK, triton.next_power_of_2(n))
    if block > MAX_BLOCK:
        raise ValueError(f"{what} {n} exceeds the kernel limit {MAX_BLOCK}")
    num_warps = 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8
    return block, num_warps


def check_ids(ids: Tensor, N: int, like: Tensor, name: str) -> None:
    """Raise unless ``ids`` is an int32/int64 (N, L) tensor on ``like``'s device."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"{name} must be a (N, L) tensor with N = {N}, got {getattr(ids, 'shape', type(ids))}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {ids.dtype}")
    if ids.device != like.device:
        raise ValueError(f"{name} is on {ids.device} but the data is on {like.device}")


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


@triton.jit
def patch_offsets(
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
    """Element offsets (BLOCK_P,) of patch ``l``'s pixels in (p, q, c) order, their channel, and the valid lanes."""
    k = tl.arange(0, BLOCK_P)
    qc = PATCH * C
    pi = k // qc
    qi = (k // C) % PATCH
    c = k % C
    row = (l // w) * PATCH + pi
    col = (l % w) * PATCH + qi
    return row * s_h + col * s_w + c * s_c, c, k < P
