"""Public fused ops of fastmae, one entry point per op, with the device dispatch.

This module is the single owner of the ops' autograd: the kernel modules hold only
``@triton.jit`` kernels and their launchers (``*_fwd`` / ``*_bwd``), and every test,
benchmark and model reaches a kernel through the functions here.

Each op runs either its Triton kernel (``fastmae.kernels``) or its eager twin
(``fastmae.reference``), with the reference's signature:

- CUDA tensors use the Triton kernels (when triton is installed);
- CPU tensors use the reference;
- ``FASTMAE_KERNELS=triton`` forces the kernels everywhere (on CPU this needs
  ``TRITON_INTERPRET=1`` in the environment before triton is imported, i.e. before fastmae),
  ``FASTMAE_KERNELS=torch`` forces the reference. The variable is read once.

The Triton path goes through ``torch.library.custom_op`` ops (``fastmae::*``)
with fake implementations and registered autograd, so ``torch.compile(...,
fullgraph=True)`` traces a model through them without graph breaks, on CPU too
(a ``triton_op`` cannot be traced on CPU: fake tensors have no data pointer).
The reference path stays plain PyTorch so Inductor can fuse it into its
neighbours. Backward kernels are custom ops of their own, so compiled
backward graphs call them the same way. The kernel modules are imported only when a kernel
first runs.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from fastmae import reference

__all__ = ["patchify_gather", "unshuffle_scatter", "gather_queries", "masked_recon_loss", "kernel_backend", "ENV_VAR"]

ENV_VAR = "FASTMAE_KERNELS"
_CHOICES = ("auto", "triton", "torch")
_UNREAD = object()
_forced: object = _UNREAD
_has_triton: bool | None = None


def _forced_backend() -> str | None:
    global _forced
    if _forced is _UNREAD:
        value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if value not in _CHOICES:
            raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {value!r}")
        _forced = None if value == "auto" else value
    return _forced  # type: ignore[return-value]


def _reset_kernel_backend() -> None:
    """Forget the cached switch so the next call re-reads the environment (for tests)."""
    global _forced
    _forced = _UNREAD


@torch.compiler.assume_constant_result
def _backend_for(device_type: str) -> str:
    global _has_triton
    forced = _forced_backend()
    if forced is not None:
        return forced
    if device_type != "cuda":
        return "torch"
    if _has_triton is None:
        _has_triton = importlib.util.find_spec("triton") is not None
    return "triton" if _has_triton else "torch"


def kernel_backend(device: torch.device | str = "cuda") -> str:
    """'triton' or 'torch': the implementation the ops use for tensors on ``device`` (for logs)."""
    return _backend_for(torch.device(device).type)


def _check_runnable(t: Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, got {t.device}; on CPU set TRITON_INTERPRET=1 before "
            f"triton is imported (importing fastmae imports it), or {ENV_VAR}=torch"
        )


# ---- K1: patchify + normalize + gather -------------------------------------------------------------------


@torch.library.custom_op("fastmae::patchify_gather", mutates_args=())
def _patchify_gather_op(
    imgs: Tensor, ids_keep: Tensor, patch_size: int, mean: Tensor | None, std: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    _check_runnable(imgs)
    from fastmae.kernels.patchify_gather import patchify_gather_fwd

    return patchify_gather_fwd(imgs, ids_keep, patch_size, mean, std, out_dtype)


@_patchify_gather_op.register_fake
def _(imgs, ids_keep, patch_size, mean, std, out_dtype):
    C = imgs.shape[3] if imgs.dtype == torch.uint8 else imgs.shape[1]
    return imgs.new_empty((imgs.shape[0], ids_keep.shape[1], patch_size * patch_size * C), dtype=out_dtype)


@torch.library.custom_op("fastmae::patchify_gather_backward", mutates_args=())
def _patchify_gather_backward_op(
    grad: Tensor, ids_keep: Tensor, patch_size: int, img_shape: list[int], img_dtype: torch.dtype
) -> Tensor:
    _check_runnable(grad)
    from fastmae.kernels.patchify_gather import patchify_gather_bwd

    return patchify_gather_bwd(grad, ids_keep, patch_size, list(img_shape), img_dtype)


@_patchify_gather_backward_op.register_fake
def _(grad, ids_keep, patch_size, img_shape, img_dtype):
    return grad.new_empty(img_shape, dtype=img_dtype)


def _patchify_gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size = inputs[:3]
    ctx.save_for_backward(ids_keep)
    ctx.patch_size = patch_size
    ctx.img_shape = list(imgs.shape)
    ctx.img_dtype = imgs.dtype


def _patchify_gather_backward(ctx, grad):
    grad_imgs = None
    if ctx.needs_input_grad[0]:
        (ids_keep,) = ctx.saved_tensors
        grad_imgs = _patchify_gather_backward_op(grad, ids_keep, ctx.patch_size, ctx.img_shape, ctx.img_dtype)
    return grad_imgs, None, None, None, None, None


_patchify_gather_op.register_autograd(_patchify_gather_backward, setup_context=_patchify_gather_setup)


def patchify_gather(
    imgs: Tensor,
    ids_keep: Tensor,
    patch_size: int,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Visible patches (K1). imgs: float (N, C, H, W) or uint8 (N, H, W, C) with mean/std (C,);
    ids_keep: (N, L_vis) -> (N, L_vis, p*p*C) in ``out_dtype`` (default fp32 for uint8, else imgs.dtype)."""
    if _backend_for(imgs.device.type) == "torch":
        return reference.patchify_gather(imgs, ids_keep, patch_size, mean, std, out_dtype)
    if out_dtype is None:
        out_dtype = torch.float32 if imgs.dtype == torch.uint8 else imgs.dtype
    return _patchify_gather_op(imgs, ids_keep, patch_size, mean, std, out_dtype)


# ---- K2: unshuffle scatter + mask token + positions -------------------------------------------------------


@torch.library.custom_op("fastmae::unshuffle_scatter", mutates_args=())
def _unshuffle_scatter_op(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor) -> Tensor:
    _check_runnable(x)
    from fastmae.kernels.unshuffle_scatter import unshuffle_scatter_fwd

    return unshuffle_scatter_fwd(x, mask_token, ids_restore, pos_embed)


@_unshuffle_scatter_op.register_fake
def _(x, mask_token, ids_restore, pos_embed):
    return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]), dtype=torch.result_type(x, pos_embed))


@torch.library.custom_op("fastmae::unshuffle_scatter_backward", mutates_args=())
def _unshuffle_scatter_backward_op(
    grad: Tensor, ids_restore: Tensor, n_vis: int, x_dtype: torch.dtype, mask_token_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    _check_runnable(grad)
    from fastmae.kernels.unshuffle_scatter import unshuffle_scatter_bwd

    return unshuffle_scatter_bwd(grad, ids_restore, n_vis, x_dtype, mask_token_dtype)


@_unshuffle_scatter_backward_op.register_fake
def _(grad, ids_restore, n_vis, x_dtype, mask_token_dtype):
    N, _, D = grad.shape
    return grad.new_empty((N, n_vis + 1, D), dtype=x_dtype), grad.new_empty((D,), dtype=mask_token_dtype)


def _unshuffle_scatter_setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = (x.shape[1] - 1, x.dtype, mask_token.dtype, pos_embed.dtype)


def _unshuffle_scatter_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    n_vis, x_dtype, mt_dtype, pos_dtype = ctx.meta
    grad_x = grad_mt = grad_pos = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x, grad_mt = _unshuffle_scatter_backward_op(grad, ids_restore, n_vis, x_dtype, mt_dtype)
    if ctx.needs_input_grad[3]:
        # Only for a trainable position table: the broadcast add's gradient, formed as autograd forms it.
        grad_pos = grad.sum(0, keepdim=True).to(pos_dtype)
    return grad_x, grad_mt, None, grad_pos


_unshuffle_scatter_op.register_autograd(_unshuffle_scatter_backward, setup_context=_unshuffle_scatter_setup)


def unshuffle_scatter(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor) -> Tensor:
    """Decoder input (K2). x: (N, 1+L_vis, D) cls first; mask_token: (D,); ids_restore: (N, L);
    pos_embed: (1, 1+L, D) -> (N, 1+L, D)."""
    if _backend_for(x.device.type) == "torch":
        return reference.unshuffle_scatter(x, mask_token, ids_restore, pos_embed)
    return _unshuffle_scatter_op(x, mask_token, ids_restore, pos_embed)


# ---- CrossMAE decoder queries: mask token + positions of the patches to predict ---------------------------


@torch.library.custom_op("fastmae::gather_queries", mutates_args=())
def _gather_queries_op(mask_token: Tensor, pos_embed: Tensor, ids: Tensor) -> Tensor:
    _check_runnable(mask_token)
    from fastmae.kernels.gather_queries import gather_queries_fwd

    return gather_queries_fwd(mask_token, pos_embed, ids)


@_gather_queries_op.register_fake
def _(mask_token, pos_embed, ids):
    shape = (ids.shape[0], ids.shape[1], mask_token.shape[0])
    return mask_token.new_empty(shape, dtype=torch.result_type(mask_token, pos_embed))


@torch.library.custom_op("fastmae::gather_queries_backward", mutates_args=())
def _gather_queries_backward_op(
    grad: Tensor, ids: Tensor, num_patches: int, mask_token_dtype: torch.dtype, pos_dtype: torch.dtype, with_pos: bool
) -> tuple[Tensor, Tensor]:
    _check_runnable(grad)
    from fastmae.kernels.gather_queries import gather_queries_bwd

    return gather_queries_bwd(grad, ids, num_patches, mask_token_dtype, pos_dtype, with_pos)


@_gather_queries_backward_op.register_fake
def _(grad, ids, num_patches, mask_token_dtype, pos_dtype, with_pos):
    D = grad.shape[2]
    grad_pos = grad.new_empty((1, num_patches + 1, D), dtype=pos_dtype) if with_pos else grad.new_empty((0,))
    return grad.new_empty((D,), dtype=mask_token_dtype), grad_pos


def _gather_queries_setup(ctx, inputs, output):
    mask_token, pos_embed, ids = inputs
    ctx.save_for_backward(ids)
    ctx.meta = (pos_embed.shape[1] - 1, mask_token.dtype, pos_embed.dtype)


def _gather_queries_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    num_patches, mt_dtype, pos_dtype = ctx.meta
    with_pos = ctx.needs_input_grad[1]
    grad_mt, grad_pos = _gather_queries_backward_op(grad, ids, num_patches, mt_dtype, pos_dtype, with_pos)
    return (grad_mt if ctx.needs_input_grad[0] else None), (grad_pos if with_pos else None), None


_gather_queries_op.register_autograd(_gather_queries_backward, setup_context=_gather_queries_setup)


def gather_queries(mask_token: Tensor, pos_embed: Tensor, ids: Tensor) -> Tensor:
    """CrossMAE decoder queries ``mask_token + pos_embed[0, ids + 1]``. mask_token: (D,); pos_embed: (1, 1+L, D)
    with the cls slot at row 0 (patch l's position is row l + 1); ids: (N, L_t) patch ids in [0, L)
    -> (N, L_t, D) in the promoted dtype of mask_token and pos_embed."""
    if _backend_for(mask_token.device.type) == "torch":
        return reference.gather_queries(mask_token, pos_embed, ids)
    return _gather_queries_op(mask_token, pos_embed, ids)


# ---- K3: masked reconstruction loss ----------------------------------------------------------------------


@torch.library.custom_op("fastmae::masked_recon_loss", mutates_args=())
def _masked_recon_loss_op(
    pred: Tensor,
    imgs: Tensor,
    ids_masked: Tensor,
    patch_size: int,
    norm_pix: bool,
    loss_type: str,
    mean: Tensor | None,
    std: Tensor | None,
    eps: float,
) -> Tensor:
    _check_runnable(pred)
    from fastmae.kernels.masked_recon_loss import masked_recon_loss_fwd

    return masked_recon_loss_fwd(pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std, eps)


@_masked_recon_loss_op.register_fake
def _(pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std, eps):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmae::masked_recon_loss_backward", mutates_args=())
def _masked_recon_loss_backward_op(
    grad_loss: Tensor,
    pred: Tensor,
    imgs: Tensor,
    ids_masked: Tensor,
    patch_size: int,
    norm_pix: bool,
    loss_type: str,
    mean: Tensor | None,
    std: Tensor | None,
    eps: float,
) -> Tensor:
    _check_runnable(pred)
    from fastmae.kernels.masked_recon_loss import masked_recon_loss_bwd

    return masked_recon_loss_bwd(grad_loss, pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std, eps)


@_masked_recon_loss_backward_op.register_fake
def _(grad_loss, pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std, eps):
    return pred.new_empty(pred.shape)


def _masked_recon_loss_setup(ctx, inputs, output):
    pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std, eps = inputs
    # The backward recomputes the target from the images (see kernels/masked_recon_loss.py): no gradient is saved.
    ctx.save_for_backward(pred, imgs, ids_masked, mean, std)
    ctx.args = (patch_size, norm_pix, loss_type, eps)


def _masked_recon_loss_backward(ctx, grad_loss):
    grad_pred = None
    if ctx.needs_input_grad[0]:
        pred, imgs, ids_masked, mean, std = ctx.saved_tensors
        patch_size, norm_pix, loss_type, eps = ctx.args
        grad_pred = _masked_recon_loss_backward_op(
            grad_loss, pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std, eps
        )
    return grad_pred, None, None, None, None, None, None, None, None


_masked_recon_loss_op.register_autograd(_masked_recon_loss_backward, setup_context=_masked_recon_loss_setup)


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
    """MAE's loss on masked patches (K3), fp32 scalar. pred: (N, L, P) or (N, L_mask, P);
    imgs: float (N, C, H, W) or uint8 (N, H, W, C) with mean/std (C,); ids_masked: (N, L_mask)."""
    if _backend_for(pred.device.type) == "torch":
        return reference.masked_recon_loss(pred, imgs, ids_masked, patch_size, norm_pix, loss_type, mean, std, eps)
    return _masked_recon_loss_op(pred, imgs, ids_masked, patch_size, bool(norm_pix), loss_type, mean, std, float(eps))
