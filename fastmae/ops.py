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

Every op is one :func:`register_op` call (schemas, fakes, what the backward keeps and how its outputs map to
input gradients) plus its typed public function; the call fills :data:`OPS`, from which the tests, the
benchmarks, the compile report and the GPU report find the ops (checklist: kernels/README.md).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # the class torch.library.custom_op returns; torch exports it under a private module only
    from torch._library.custom_ops import CustomOpDef

from fastmae import reference

__all__ = [
    "patchify_gather", "unshuffle_scatter", "gather_queries", "masked_recon_loss", "kernel_backend", "set_kernel_backend",
    "use_kernel_backend", "ENV_VAR", "OPS", "KernelOp", "register_op",
]

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


def set_kernel_backend(name: str | None) -> None:
    """Force ``"triton"``, ``"torch"`` or ``"auto"`` for every op in this process; ``None`` goes back to
    ``FASTMAE_KERNELS`` (read again on the next call). Tests and benches use it to compare backends."""
    global _forced
    if name is None:
        _forced = _UNREAD
        return
    if name not in _CHOICES:
        raise ValueError(f"kernel backend must be one of {_CHOICES}, got {name!r}")
    _forced = None if name == "auto" else name


@contextlib.contextmanager
def use_kernel_backend(name: str) -> Iterator[None]:
    """:func:`set_kernel_backend` inside the block only."""
    global _forced
    saved = _forced
    set_kernel_backend(name)
    try:
        yield
    finally:
        _forced = saved


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


# ---- the registry: one call per op ------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOp:
    """One fused op as the registry knows it. By convention everything else is found from ``name``: the eager
    twin ``fastmae.reference.<name>``, the launchers ``<name>_fwd`` / ``<name>_bwd`` in ``kernels/<name>.py``,
    the tests ``tests/test_<name>.py`` and the benchmark ``bench/bench_<name>.py``."""

    name: str
    forward: CustomOpDef  # fastmae::<name>
    backward: CustomOpDef  # fastmae::<name>_backward

    @property
    def reference(self) -> Callable[..., Any]:
        return getattr(reference, self.name)

    @property
    def kernel_module(self) -> str:
        return f"fastmae.kernels.{self.name}"


OPS: dict[str, KernelOp] = {}


def _launcher(module: str, launcher: str) -> Callable[..., Any]:
    """The custom op's body: the Triton launcher, its module imported on the first call (it imports triton)."""

    def launch(*args):
        _check_runnable(args[0])
        return getattr(importlib.import_module(f"fastmae.kernels.{module}"), launcher)(*args)

    launch.__name__ = launcher
    return launch


def _grad_of_first(needs: tuple[bool, ...], backward: Callable[..., Any], grad: Tensor, *saved) -> tuple:
    """The default backward: the backward kernel gives the first input's gradient; the other inputs have none."""
    return (backward(*saved) if needs[0] else None, *(None,) * (len(needs) - 1))


def _autograd(op: CustomOpDef, backward_op: CustomOpDef, save: Callable[..., tuple], grads: Callable[..., tuple]) -> None:
    """Registers ``op``'s backward: ``save(*inputs)`` picks what it keeps (tensors through ``save_for_backward``),
    ``grads(needs_input_grad, backward, grad, *saved)`` maps the backward kernel's outputs to input gradients."""

    def setup_context(ctx, inputs, output):
        saved = save(*inputs)
        ctx.slots = [i for i, a in enumerate(saved) if isinstance(a, Tensor)]
        ctx.save_for_backward(*(saved[i] for i in ctx.slots))
        ctx.meta = [None if i in ctx.slots else a for i, a in enumerate(saved)]

    def backward(ctx, grad):
        saved = list(ctx.meta)
        for i, t in zip(ctx.slots, ctx.saved_tensors, strict=True):
            saved[i] = t
        return grads(ctx.needs_input_grad, lambda *args: backward_op(grad, *args), grad, *saved)

    op.register_autograd(backward, setup_context=setup_context)


def register_op(name: str, schema: str, fake: Callable[..., Any], backward_schema: str, backward_fake: Callable[..., Any],
                save: Callable[..., tuple], grads: Callable[..., tuple] = _grad_of_first) -> Callable[..., Any]:
    """Registers the custom ops ``fastmae::<name>`` and ``fastmae::<name>_backward`` (bodies: the launchers of
    ``kernels/<name>.py``; ``fake`` / ``backward_fake`` give their output shapes to the compiler), the autograd
    that joins them (see :func:`_autograd`), and an entry in :data:`OPS`. Returns the device dispatch: the
    reference on the torch backend, else the custom op, called with the op's arguments in schema order."""
    if name in OPS:
        raise ValueError(f"op {name!r} is registered twice")
    forward = torch.library.custom_op(f"fastmae::{name}", _launcher(name, f"{name}_fwd"), mutates_args=(), schema=schema)
    forward.register_fake(fake)
    backward = torch.library.custom_op(f"fastmae::{name}_backward", _launcher(name, f"{name}_bwd"), mutates_args=(),
                                       schema=backward_schema)
    backward.register_fake(backward_fake)
    _autograd(forward, backward, save, grads)
    OPS[name] = KernelOp(name, forward, backward)

    def dispatch(*args):
        if _backend_for(args[0].device.type) == "torch":
            # Looked up per call (not bound here), so the twin is always the module's current function.
            return getattr(reference, name)(*args)
        return forward(*args)

    dispatch.__name__ = name
    return dispatch


# ---- K1: patchify + normalize + gather -------------------------------------------------------------------


def _patchify_gather_fake(imgs, ids_keep, patch_size, mean, std, out_dtype):
    C = imgs.shape[3] if imgs.dtype == torch.uint8 else imgs.shape[1]
    return imgs.new_empty((imgs.shape[0], ids_keep.shape[1], patch_size * patch_size * C), dtype=out_dtype)


_patchify_gather = register_op(
    "patchify_gather",
    "(Tensor imgs, Tensor ids_keep, SymInt patch_size, Tensor? mean, Tensor? std, ScalarType out_dtype) -> Tensor",
    _patchify_gather_fake,
    "(Tensor grad, Tensor ids_keep, SymInt patch_size, SymInt[] img_shape, ScalarType img_dtype) -> Tensor",
    lambda grad, ids_keep, patch_size, img_shape, img_dtype: grad.new_empty(img_shape, dtype=img_dtype),
    save=lambda imgs, ids_keep, patch_size, *_: (ids_keep, patch_size, list(imgs.shape), imgs.dtype),
)


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
    if out_dtype is None:
        out_dtype = torch.float32 if imgs.dtype == torch.uint8 else imgs.dtype
    return _patchify_gather(imgs, ids_keep, patch_size, mean, std, out_dtype)


# ---- K2: unshuffle scatter + mask token + positions -------------------------------------------------------


def _unshuffle_scatter_fake_backward(grad, ids_restore, n_vis, x_dtype, mask_token_dtype):
    N, _, D = grad.shape
    return grad.new_empty((N, n_vis + 1, D), dtype=x_dtype), grad.new_empty((D,), dtype=mask_token_dtype)


def _unshuffle_scatter_grads(needs, backward, grad, ids_restore, n_vis, x_dtype, mt_dtype, pos_dtype):
    grad_x = grad_mt = grad_pos = None
    if needs[0] or needs[1]:
        grad_x, grad_mt = backward(ids_restore, n_vis, x_dtype, mt_dtype)
    if needs[3]:
        # Only for a trainable position table: the broadcast add's gradient, formed as autograd forms it.
        grad_pos = grad.sum(0, keepdim=True).to(pos_dtype)
    return grad_x, grad_mt, None, grad_pos


_unshuffle_scatter = register_op(
    "unshuffle_scatter",
    "(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor pos_embed) -> Tensor",
    lambda x, mask_token, ids_restore, pos_embed: x.new_empty(
        (x.shape[0], ids_restore.shape[1] + 1, x.shape[2]), dtype=torch.result_type(x, pos_embed)),
    "(Tensor grad, Tensor ids_restore, SymInt n_vis, ScalarType x_dtype, ScalarType mask_token_dtype) -> (Tensor, Tensor)",
    _unshuffle_scatter_fake_backward,
    save=lambda x, mask_token, ids_restore, pos_embed: (ids_restore, x.shape[1] - 1, x.dtype, mask_token.dtype,
                                                        pos_embed.dtype),
    grads=_unshuffle_scatter_grads,
)


def unshuffle_scatter(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor) -> Tensor:
    """Decoder input (K2). x: (N, 1+L_vis, D) cls first; mask_token: (D,); ids_restore: (N, L);
    pos_embed: (1, 1+L, D) -> (N, 1+L, D)."""
    return _unshuffle_scatter(x, mask_token, ids_restore, pos_embed)


# ---- CrossMAE decoder queries: mask token + positions of the patches to predict ---------------------------


def _gather_queries_fake_backward(grad, ids, num_patches, mask_token_dtype, pos_dtype, with_pos):
    D = grad.shape[2]
    grad_pos = grad.new_empty((1, num_patches + 1, D), dtype=pos_dtype) if with_pos else grad.new_empty((0,))
    return grad.new_empty((D,), dtype=mask_token_dtype), grad_pos


def _gather_queries_grads(needs, backward, grad, ids, num_patches, mt_dtype, pos_dtype):
    with_pos = needs[1]
    grad_mt, grad_pos = backward(ids, num_patches, mt_dtype, pos_dtype, with_pos)
    return (grad_mt if needs[0] else None), (grad_pos if with_pos else None), None


_gather_queries = register_op(
    "gather_queries",
    "(Tensor mask_token, Tensor pos_embed, Tensor ids) -> Tensor",
    lambda mask_token, pos_embed, ids: mask_token.new_empty(
        (ids.shape[0], ids.shape[1], mask_token.shape[0]), dtype=torch.result_type(mask_token, pos_embed)),
    "(Tensor grad, Tensor ids, SymInt num_patches, ScalarType mask_token_dtype, ScalarType pos_dtype, bool with_pos)"
    " -> (Tensor, Tensor)",
    _gather_queries_fake_backward,
    save=lambda mask_token, pos_embed, ids: (ids, pos_embed.shape[1] - 1, mask_token.dtype, pos_embed.dtype),
    grads=_gather_queries_grads,
)


def gather_queries(mask_token: Tensor, pos_embed: Tensor, ids: Tensor) -> Tensor:
    """CrossMAE decoder queries ``mask_token + pos_embed[0, ids + 1]``. mask_token: (D,); pos_embed: (1, 1+L, D)
    with the cls slot at row 0 (patch l's position is row l + 1); ids: (N, L_t) patch ids in [0, L)
    -> (N, L_t, D) in the promoted dtype of mask_token and pos_embed."""
    return _gather_queries(mask_token, pos_embed, ids)


# ---- K3: masked reconstruction loss ----------------------------------------------------------------------

_LOSS_ARGS = ("Tensor pred, Tensor imgs, Tensor ids_masked, SymInt patch_size, bool norm_pix, str loss_type, Tensor? mean, "
              "Tensor? std, float eps")

_masked_recon_loss = register_op(
    "masked_recon_loss",
    f"({_LOSS_ARGS}) -> Tensor",
    lambda pred, *_: pred.new_empty((), dtype=torch.float32),
    f"(Tensor grad_loss, {_LOSS_ARGS}) -> Tensor",
    lambda grad_loss, pred, *_: pred.new_empty(pred.shape),
    # The backward recomputes the target from the images (see kernels/masked_recon_loss.py): no gradient is saved.
    save=lambda *inputs: inputs,
)


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
    return _masked_recon_loss(pred, imgs, ids_masked, patch_size, bool(norm_pix), loss_type, mean, std, float(eps))
