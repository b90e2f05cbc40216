"""K2: decoder input in one pass: unshuffle the visible tokens, fill the mask token, add positions.

Forward: one program per output row ``(n, t)``, ``t in [0, 1+L)``. Row 0 is the
cls token; row ``t > 0`` holds patch ``t-1``, whose slot in the shuffled order is
``r = ids_restore[n, t-1]``: visible tokens (``r < L_vis``) come from
``x[n, 1+r]``, the others are the mask token. Both candidate loads are masked so
only one of them touches memory. The sum with the position row is taken in fp32
and rounded once to the output dtype, which is how PyTorch evaluates
``x + pos_embed`` for fp32/bf16/fp16 (type promotion included).

Backward: one program per tile of ``BLOCK_T`` output rows x ``BLOCK_D`` columns
of one sample loads the tile's gradient at once, stores the visible rows into
``grad_x`` (the cls row and ``x[n, 1+r]``) and sums the masked rows in fp32 into
one partial row per tile, ``(N, T_BLOCKS, D)`` (1/BLOCK_T of the gradient's
size); ``torch.sum`` reduces the partials. The mask token's gradient is thus a
fixed-order reduction (deterministic, run to run) without any ``(N, L, D)``
intermediate; its summation order differs from PyTorch's, so it matches the
reference within fp32 rounding, not bitwise. The position table's gradient
(only when it is trainable) is the batch sum of the output gradient.

``ids_restore`` must be a permutation of ``range(L)`` per row (``argsort`` of
``ids_shuffle``), as in the reference; it is not checked on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, block_config, check_ids

__all__ = ["bwd_config", "unshuffle_scatter_fwd", "unshuffle_scatter_bwd"]

# Backward tiles: BLOCK_T rows x BLOCK_D columns, loaded at once (no serial row loop, so many
# loads are in flight), with one fp32 partial sum of the masked rows per tile.
BWD_BLOCK_D = 128
BWD_TILE = 4096


def bwd_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the backward kernel for width D: 2-D tiles of ~4K values."""
    block_d = min(BWD_BLOCK_D, max(16, triton.next_power_of_2(D)))
    return BWD_TILE // block_d, block_d, 8


@triton.jit
def _unshuffle_scatter_fwd_kernel(
    x_ptr,  # (N, 1+L_vis, D), any strides, unit stride on D
    mask_token_ptr,  # (D,) in x.dtype
    ids_restore_ptr,  # (N, L) int
    pos_ptr,  # (1+L, D), unit stride on D
    out_ptr,  # (N, 1+L, D) contiguous
    L,
    L_vis,
    D,
    s_xn,
    s_xt,
    s_idn,
    s_idl,
    s_pt,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    l = tl.maximum(t - 1, 0)
    r = tl.load(ids_restore_ptr + n * s_idn + l * s_idl).to(tl.int64)
    # Row 0 (cls) reads x[n, 0]; a visible patch reads x[n, 1 + r].
    src = tl.where(t == 0, 0, 1 + r)
    masked = (t != 0) & (r >= L_vis)
    xv = tl.load(x_ptr + n * s_xn + src * s_xt + d, mask=dm & (masked == 0), other=0.0)
    mt = tl.load(mask_token_ptr + d, mask=dm & masked, other=0.0)
    v = tl.where(masked, mt, xv).to(tl.float32)
    pos = tl.load(pos_ptr + t * s_pt + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(out_ptr + (n * (L + 1) + t) * D + d, (v + pos).to(out_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _unshuffle_scatter_bwd_kernel(
    grad_out_ptr,  # (N, 1+L, D) contiguous
    ids_restore_ptr,  # (N, L) int
    grad_x_ptr,  # (N, 1+L_vis, D) contiguous
    partial_ptr,  # (N, T_BLOCKS, D) fp32: per-tile sums of the masked rows
    L,
    L_vis,
    D,
    T_BLOCKS,
    s_idn,
    s_idl,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    t = (tb * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # output rows of this tile
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    valid = t <= L
    r = tl.load(ids_restore_ptr + n * s_idn + (t - 1) * s_idl, mask=valid & (t > 0), other=0).to(tl.int64)
    visible = valid & ((t == 0) | (r < L_vis))
    masked = valid & (t > 0) & (r >= L_vis)
    dst = tl.where(t == 0, 0, 1 + r)
    g = tl.load(grad_out_ptr + (n * (L + 1) + t)[:, None] * D + d[None, :], mask=valid[:, None] & dm[None, :],
                other=0.0)
    gx = g.to(grad_x_ptr.dtype.element_ty)
    tl.store(grad_x_ptr + (n * (L_vis + 1) + dst)[:, None] * D + d[None, :], gx, mask=visible[:, None] & dm[None, :])
    # Summed as x's dtype, the way autograd hands the reference's expand-sum its gradient.
    acc = tl.sum(tl.where(masked[:, None], gx.to(tl.float32), 0.0), axis=0)
    tl.store(partial_ptr + (n * T_BLOCKS + tb) * D + d, acc, mask=dm)


def _check(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor) -> tuple[int, int, int, int]:
    for name, t in (("x", x), ("mask_token", mask_token), ("ids_restore", ids_restore), ("pos_embed", pos_embed)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 3:
        raise ValueError(f"x must be (N, 1+L_vis, D), got {tuple(x.shape)}")
    N, n_tok, D = x.shape
    check_ids(ids_restore, N, x, "ids_restore")
    L = ids_restore.shape[1]
    if not 1 <= n_tok <= L + 1:
        raise ValueError(f"x has {n_tok} tokens; expected cls + 0..{L} visible tokens")
    if tuple(mask_token.shape) != (D,):
        raise ValueError(f"mask_token must be ({D},), got {tuple(mask_token.shape)}")
    if tuple(pos_embed.shape) != (1, L + 1, D):
        raise ValueError(f"pos_embed must be (1, {L + 1}, {D}), got {tuple(pos_embed.shape)}")
    for name, t in (("x", x), ("mask_token", mask_token), ("pos_embed", pos_embed)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32, bf16 or fp16, got {t.dtype}")
    return N, n_tok - 1, L, D


def unshuffle_scatter_fwd(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor) -> Tensor:
    """x: (N, 1+L_vis, D), mask_token: (D,), ids_restore: (N, L), pos_embed: (1, 1+L, D) -> (N, 1+L, D)."""
    N, L_vis, L, D = _check(x, mask_token, ids_restore, pos_embed)
    block, num_warps = block_config(D, "embedding dim")
    if x.stride(2) != 1:
        x = x.contiguous()
    pos = pos_embed[0]
    if pos.stride(1) != 1:
        pos = pos.contiguous()
    # Cast on the host, as the reference does: a (D,) op that keeps the kernel free of fp32 -> bf16 rounding.
    mt = mask_token.to(x.dtype).contiguous()
    out = torch.empty(N, L + 1, D, device=x.device, dtype=torch.result_type(x, pos_embed))
    if out.numel() == 0:
        return out
    _unshuffle_scatter_fwd_kernel[(N, L + 1)](
        x, mt, ids_restore, pos, out, L, L_vis, D, x.stride(0), x.stride(1), *ids_restore.stride(), pos.stride(0),
        BLOCK_D=block, num_warps=num_warps,
    )
    return out


def unshuffle_scatter_bwd(
    grad_out: Tensor, ids_restore: Tensor, n_vis: int, x_dtype: torch.dtype, mask_token_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """grad_out: (N, 1+L, D) -> grad_x (N, 1+L_vis, D) in x_dtype, grad_mask_token (D,) in mask_token_dtype."""
    N, T, D = grad_out.shape
    L = T - 1
    if ids_restore.shape != (N, L):
        raise ValueError(f"ids_restore must be {(N, L)}, got {tuple(ids_restore.shape)}")
    grad_out = grad_out.contiguous()
    grad_x = torch.empty(N, n_vis + 1, D, device=grad_out.device, dtype=x_dtype)
    if grad_out.numel() == 0:
        return grad_x, torch.zeros(D, device=grad_out.device, dtype=mask_token_dtype)
    block_t, block_d, num_warps = bwd_config(D)
    t_blocks = triton.cdiv(L + 1, block_t)
    partial = torch.empty(N, t_blocks, D, device=grad_out.device, dtype=torch.float32)
    _unshuffle_scatter_bwd_kernel[(N, t_blocks, triton.cdiv(D, block_d))](
        grad_out, ids_restore, grad_x, partial, L, n_vis, D, t_blocks, *ids_restore.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    # The reference sums the expanded mask tokens in x's dtype, then casts to the parameter's dtype.
    grad_mt = partial.sum((0, 1)).to(x_dtype).to(mask_token_dtype)
    return grad_x, grad_mt
