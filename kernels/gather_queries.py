"""CrossMAE decoder queries: the mask token plus the position of each patch to predict.

CrossMAE's decoder predicts a subset of the masked patches, ``ids`` ``(N, L_t)``; its
queries are ``mask_token + pos_embed[0, ids + 1]``. Position tables keep the cls token's
slot at row 0 (as MAE's ``decoder_pos_embed``), so patch ``l`` sits at row ``l + 1``.

Forward: one program per query ``(n, j)`` reads the patch id, the mask token and that
position row, adds them in fp32 and rounds once to the output dtype (the promoted dtype
of the two), which is how PyTorch evaluates ``mask_token + pos`` for fp32/bf16/fp16.

Backward: the mask token's gradient is the sum of the output gradient over every query;
the position table's gradient (only when it is trainable) is, per patch ``l``, the sum
over the samples that query ``l``. One program per (patch ``l``, column block) computes
both without atomics: a ``(N, L)`` int32 map from the ids gives, for each sample, the
query row that holds patch ``l`` (or -1), and the program sums those rows over the
batch in tiles of ``BLOCK_N`` samples, in fp32 and a fixed order (deterministic run to
run). Its per-patch sums go to the position gradient (rows ``1..L``; row 0, the cls
slot, is zero) and to an ``(L, D)`` fp32 partial that ``torch.sum`` reduces into the
mask token's gradient. Each output-gradient row is read once. Summation orders differ
from PyTorch's, so the gradients match the reference within fp32 rounding, not bitwise.
The ids of a row must be distinct (a subset of one sample's patches), as they are for
CrossMAE; this is not checked on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, block_config, check_ids

__all__ = ["bwd_config", "gather_queries_fwd", "gather_queries_bwd"]

BWD_BLOCK_N = 32
BWD_BLOCK_D = 128


def bwd_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) of the backward kernel for width D: tiles of up to 32 samples x 128 columns."""
    return BWD_BLOCK_N, min(BWD_BLOCK_D, max(16, triton.next_power_of_2(D))), 4


@triton.jit
def _gather_queries_fwd_kernel(
    mask_token_ptr,  # (D,) contiguous
    pos_ptr,  # (1+L, D), unit stride on D; row 0 is the cls slot
    ids_ptr,  # (N, L_t) int, patch ids in [0, L)
    out_ptr,  # (N, L_t, D) contiguous
    L_t,
    D,
    s_idn,
    s_idl,
    s_pt,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    l = tl.load(ids_ptr + n * s_idn + j * s_idl).to(tl.int64)
    mt = tl.load(mask_token_ptr + d, mask=dm, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + (l + 1) * s_pt + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(out_ptr + (n * L_t + j) * D + d, (mt + pos).to(out_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _gather_queries_bwd_kernel(
    grad_out_ptr,  # (N, L_t, D) contiguous
    slot_ptr,  # (N, L) int32: the query row j with ids[n, j] == l, or -1
    partial_ptr,  # (L, D) fp32: per-patch sums, reduced into the mask token's gradient
    grad_pos_ptr,  # (1+L, D) contiguous, pos dtype; rows 1..L written when WRITE_POS
    N,
    L,
    L_t,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_POS: tl.constexpr,
    CAST_POS: tl.constexpr,  # pos dtype != output dtype: autograd hands index_select each term in pos dtype
):
    l = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_pos = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        j = tl.load(slot_ptr + n * L + l, mask=n < N, other=-1).to(tl.int64)
        hit = j >= 0
        g = tl.load(grad_out_ptr + (n * L_t + j)[:, None] * D + d[None, :], mask=hit[:, None] & dm[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
        if CAST_POS:
            acc_pos += tl.sum(g.to(grad_pos_ptr.dtype.element_ty).to(tl.float32), axis=0)
    tl.store(partial_ptr + l * D + d, acc, mask=dm)
    if WRITE_POS:
        if not CAST_POS:
            acc_pos = acc
        tl.store(grad_pos_ptr + (l + 1) * D + d, acc_pos.to(grad_pos_ptr.dtype.element_ty), mask=dm)


def _check(mask_token: Tensor, pos_embed: Tensor, ids: Tensor) -> tuple[int, int, int, int]:
    for name, t in (("mask_token", mask_token), ("pos_embed", pos_embed)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32, bf16 or fp16, got {t.dtype}")
    if mask_token.dim() != 1:
        raise ValueError(f"mask_token must be (D,), got {tuple(mask_token.shape)}")
    D = mask_token.shape[0]
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != D or pos_embed.shape[1] < 2:
        raise ValueError(f"pos_embed must be (1, 1+L, {D}) with the cls slot at row 0, got {tuple(pos_embed.shape)}")
    if pos_embed.device != mask_token.device:
        raise ValueError(f"pos_embed is on {pos_embed.device} but mask_token is on {mask_token.device}")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"ids must be a (N, L_t) tensor, got {getattr(ids, 'shape', type(ids))}")
    check_ids(ids, ids.shape[0], mask_token, "ids")
    return ids.shape[0], ids.shape[1], pos_embed.shape[1] - 1, D


def gather_queries_fwd(mask_token: Tensor, pos_embed: Tensor, ids: Tensor) -> Tensor:
    """mask_token: (D,), pos_embed: (1, 1+L, D), ids: (N, L_t) -> (N, L_t, D) in the promoted dtype."""
    N, L_t, _, D = _check(mask_token, pos_embed, ids)
    block, num_warps = block_config(D, "embedding dim")
    pos = pos_embed[0]
    if pos.stride(1) != 1:
        pos = pos.contiguous()
    out = torch.empty(N, L_t, D, device=mask_token.device, dtype=torch.result_type(mask_token, pos_embed))
    if out.numel() == 0:
        return out
    _gather_queries_fwd_kernel[(N, L_t)](
        mask_token.contiguous(), pos, ids, out, L_t, D, *ids.stride(), pos.stride(0), BLOCK_D=block, num_warps=num_warps,
    )
    return out


def gather_queries_bwd(
    grad_out: Tensor, ids: Tensor, num_patches: int, mask_token_dtype: torch.dtype, pos_dtype: torch.dtype,
    with_pos: bool,
) -> tuple[Tensor, Tensor]:
    """grad_out: (N, L_t, D) -> grad_mask_token (D,) in mask_token_dtype and, if ``with_pos``, grad_pos_embed
    (1, 1+L, D) in pos_dtype (else an empty tensor), L = ``num_patches``."""
    N, L_t, D = grad_out.shape
    L = num_patches
    check_ids(ids, N, grad_out, "ids")
    if ids.shape[1] != L_t:
        raise ValueError(f"ids must be {(N, L_t)}, got {tuple(ids.shape)}")
    device = grad_out.device
    grad_pos = torch.empty(1, 1 + L, D, device=device, dtype=pos_dtype) if with_pos else torch.empty(0, device=device)
    if with_pos:
        grad_pos[:, 0].zero_()
    if grad_out.numel() == 0:
        if with_pos:
            grad_pos.zero_()
        return torch.zeros(D, device=device, dtype=mask_token_dtype), grad_pos
    grad_out = grad_out.contiguous()
    slot = torch.full((N, L), -1, device=device, dtype=torch.int32)
    slot.scatter_(1, ids.to(torch.int64), torch.arange(L_t, device=device, dtype=torch.int32).expand(N, L_t))
    partial = torch.empty(L, D, device=device, dtype=torch.float32)
    block_n, block_d, num_warps = bwd_config(D)
    _gather_queries_bwd_kernel[(L, triton.cdiv(D, block_d))](
        grad_out, slot, partial, grad_pos if with_pos else partial, N, L, L_t, D,
        BLOCK_N=block_n, BLOCK_D=block_d, WRITE_POS=with_pos, CAST_POS=with_pos and pos_dtype != grad_out.dtype,
        num_warps=num_warps,
    )
    # The reference sums the mask token's terms in the output dtype, then casts to the parameter's dtype.
    grad_mt = partial.sum(0).to(grad_out.dtype).to(mask_token_dtype)
    return grad_mt, grad_pos
