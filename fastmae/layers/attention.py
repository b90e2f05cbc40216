"""Multi-head self-attention with one backend choice for the whole process.

Backends:
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (default; on
  CUDA it picks FlashAttention/memory-efficient kernels itself);
- ``flash``: the ``flash-attn`` package's packed-QKV kernel, used when it is
  installed, the tensor is on CUDA and in fp16/bf16 (it supports nothing
  else; other calls fall back to SDPA);
- ``eager``: softmax(QK^T / sqrt(d)) V spelled out, for debugging.

The choice is resolved once, from ``FASTMAE_ATTN`` (``auto`` by default:
``flash`` where installed and a GPU is present, else ``sdpa``), and reported
by :func:`attention_backend` so logs say what ran.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BACKENDS = ("auto", "sdpa", "flash", "eager")
_override: str | None = None
_resolved: str | None = None


def _flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve(requested: str) -> str:
    if requested not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "flash" if _flash_available() else "sdpa"
    if requested == "flash" and not _flash_available():
        raise ValueError("attention backend 'flash' needs the flash-attn package and a CUDA GPU (pip install '.[flash]')")
    return requested


def attention_backend() -> str:
    """The backend every Attention module uses in this process (resolved on first use, then fixed)."""
    global _resolved
    if _resolved is None:
        _resolved = _resolve(_override or os.environ.get("FASTMAE_ATTN", "auto"))
    return _resolved


def set_attention_backend(name: str | None) -> None:
    """Override ``FASTMAE_ATTN`` (None restores it). Call before building or compiling models."""
    global _override, _resolved
    _resolved = _resolve(name or os.environ.get("FASTMAE_ATTN", "auto"))
    _override = name


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        attention_backend()  # resolve (and validate) the process-wide choice before any forward is traced

    def _qkv(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, 3, H, Dh)"""
        B, T, _ = x.shape
        return self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, D)"""
        B, T, D = x.shape
        qkv = self._qkv(x)
        backend = attention_backend()
        if backend == "flash" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_qkvpacked_func

            out = flash_attn_qkvpacked_func(qkv, softmax_scale=self.scale).reshape(B, T, D)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
            if backend == "eager":
                out = self._eager_probs(q, k) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj(out)

    def _eager_probs(self, q: Tensor, k: Tensor) -> Tensor:
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def attention_probs(self, x: Tensor) -> Tensor:
        """Attention maps for diagnostics. x: (B, T, D) -> (B, H, T, T), rows sum to 1."""
        q, k, _ = self._qkv(x).permute(2, 0, 3, 1, 4).unbind(0)
        return self._eager_probs(q, k)
