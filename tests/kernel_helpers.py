"""Shared helpers of the Triton kernel tests (K1-K3, dispatch, whole model).

Importing this module turns the Triton interpreter on when no GPU is present:
triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when a kernel
module is first imported, so the variable must be set before. Tests therefore
get the kernel modules from ``kernel_module`` (never a top-level
``from fastmae.kernels... import``, which import sorting would hoist above this
module).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETER else "cuda")


def kernel_module(name: str) -> ModuleType:
    """``fastmae.kernels.<name>``, imported after the interpreter switch above."""
    return importlib.import_module(f"fastmae.kernels.{name}")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def kernel_downcast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a kernel's ``.to(dtype)`` of fp32 values gives on this machine.

    Under ``TRITON_INTERPRET=1`` (triton 3.8) an fp32 -> bf16 conversion inside a kernel truncates
    (rounds toward zero), even with ``fp_downcast_rounding="rtne"``; GPUs and PyTorch round to nearest
    even. fp32 -> fp16 rounds to nearest even in both. This helper reproduces the interpreter's
    truncation so bf16 results can still be compared bit for bit.
    """
    x = x.to(torch.float32)
    if dtype == torch.bfloat16 and INTERPRETER:
        return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return x.to(dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (in fp32), floored at the smallest normal spacing."""
    info = torch.finfo(dtype)
    mag = x.abs().to(torch.float32).clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def masking(N: int, L: int, ratio: float, seed: int = 0, device=DEVICE):
    """ids_keep (N, L_vis), ids_restore (N, L), ids_masked (N, L - L_vis), as the model builds them."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(N, L, generator=g)
    len_keep = int(L * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return (ids_shuffle[:, :len_keep].to(device), ids_restore.to(device), ids_shuffle[:, len_keep:].to(device))


def images(N: int, C: int, H: int, W: int, kind: str, seed: int = 0, device=DEVICE):
    """uint8 (N, H, W, C) with mean/std (C,), or float (N, C, H, W) of dtype ``kind``; returns (imgs, mean, std)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uint8":
        imgs = torch.randint(0, 256, (N, H, W, C), generator=g, dtype=torch.uint8)
        mean = torch.tensor((IMAGENET_MEAN * 2)[:C]) if C > 1 else torch.tensor([0.5])
        std = torch.tensor((IMAGENET_STD * 2)[:C]) if C > 1 else torch.tensor([0.25])
        return imgs.to(device), mean.to(device), std.to(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    return torch.randn(N, C, H, W, generator=g).to(device=device, dtype=dtype), None, None


def step_outputs(model, x: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """One forward+backward: (loss, pred, mask, {param name: grad}); compiled models' names unprefixed."""
    model.zero_grad(set_to_none=True)
    loss, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), mask, grads
